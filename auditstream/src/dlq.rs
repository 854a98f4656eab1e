//! `auditstream dlq list|replay`: the dead-letter topic of deliveries, or
//! with `--events` that of events the router could not route.

use std::process::ExitCode;

use deliverer::dlq::{self, Filter, Parked};
use rdkafka::error::KafkaError;
use router::dlq::{self as events_dlq, ParkedEvent, Window};
use serde_json::json;

use crate::roles::{EXIT_CONFIG, RoleArgs};

/// Which parked deliveries (or events).
#[derive(clap::Args)]
pub struct Select {
    /// Events the router parked (audit.events.dlq: unregistered type, no
    /// id, not an event) instead of deliveries; a replay writes them back
    /// to audit.events.
    #[arg(long, conflicts_with = "destination")]
    events: bool,
    /// Only this destination id.
    #[arg(long)]
    destination: Option<String>,
    /// Parked at or after: an RFC 3339 time, or a duration ago (`2h`).
    #[arg(long)]
    since: Option<String>,
    /// Parked before: an RFC 3339 time, or a duration ago.
    #[arg(long)]
    until: Option<String>,
    #[command(flatten)]
    role: RoleArgs,
}

/// `auditstream dlq` commands.
#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// List parked deliveries (newest last).
    List {
        #[command(flatten)]
        select: Select,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write parked deliveries back into audit.deliveries (with --events:
    /// parked events into audit.events), event id unchanged. Replaying
    /// twice delivers twice; receivers dedupe on id.
    Replay {
        #[command(flatten)]
        select: Select,
        /// Show what would be replayed, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_time(text: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    Ok(now as i64 - ago.as_millis() as i64)
}

fn filter(select: &Select) -> Result<Filter, String> {
    Ok(Filter {
        destination: select.destination.clone(),
        window: Window {
            since_ms: select.since.as_deref().map(parse_time).transpose()?,
            until_ms: select.until.as_deref().map(parse_time).transpose()?,
        },
    })
}

fn parked_at(ms: Option<i64>) -> Option<String> {
    ms.and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .map(proto::event::format_timestamp)
}

fn row(p: &Parked) -> serde_json::Value {
    json!({
        "parked_at": parked_at(p.parked_at_ms),
        "partition": p.partition,
        "offset": p.offset,
        "destination": p.meta.as_ref().map(|m| m.destination_id.clone()),
        "event_id": p.meta.as_ref().map(|m| m.event_id.clone()),
        "event_type": p.meta.as_ref().map(|m| m.event_type.clone()),
        "attempts": p.meta.as_ref().map(|m| m.attempt),
        "reason": p.reason,
    })
}

fn event_row(p: &ParkedEvent) -> serde_json::Value {
    json!({
        "parked_at": parked_at(p.parked_at_ms),
        "partition": p.partition,
        "offset": p.offset,
        "key": p.key.as_deref().map(String::from_utf8_lossy),
        "event_id": p.event_id,
        "event_type": p.event_type,
        "reason": p.reason,
    })
}

fn print_event_table(parked: &[ParkedEvent]) {
    println!("{:<25} {:<24} {:<38} {:<34}  REASON", "PARKED AT", "KEY", "EVENT ID", "TYPE");
    for p in parked {
        let r = event_row(p);
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
        println!("{:<25} {:<24} {:<38} {:<34}  {}", s("parked_at"), s("key"), s("event_id"), s("event_type"), p.reason);
    }
    println!("{} parked events", parked.len());
}

fn print_table(parked: &[Parked]) {
    println!("{:<25} {:<24} {:<38} {:<34} {:>8}  REASON", "PARKED AT", "DESTINATION", "EVENT ID", "TYPE", "ATTEMPTS");
    for p in parked {
        let r = row(p);
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
        println!(
            "{:<25} {:<24} {:<38} {:<34} {:>8}  {}",
            s("parked_at"),
            s("destination"),
            s("event_id"),
            s("event_type"),
            r["attempts"],
            p.reason
        );
    }
    println!("{} parked deliveries", parked.len());
}

/// Runs a `dlq` command.
pub async fn run(command: DlqCommand) -> ExitCode {
    let (select, action) = match &command {
        DlqCommand::List { select, .. } | DlqCommand::Replay { select, .. } => (select, &command),
    };
    let config = match crate::roles::load::<deliverer::DelivererConfig>(&select.role, |c| c.kafka.validate()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = match filter(select) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let kafka = &config.kafka;
    if select.events {
        let parked = events_dlq::read(kafka, filter.window).await;
        let topic = Topic {
            name: "the events' dead-letter topic",
            replayed: "events into audit.events",
            skipped: "tombstones (records without an event)",
        };
        return act(action, topic, parked, event_row, print_event_table, async |p| events_dlq::replay(kafka, p).await)
            .await;
    }
    let parked = dlq::read(kafka, &filter).await;
    let topic = Topic {
        name: "the dead-letter topic",
        replayed: "deliveries into the flow",
        skipped: "records whose delivery (destination, event id and type) cannot be read",
    };
    act(action, topic, parked, row, print_table, async |p| dlq::replay(kafka, p).await).await
}

/// How the command speaks of one dead-letter topic.
struct Topic {
    /// The topic, for an error reading it.
    name: &'static str,
    /// What a replay put back, and where, after its count.
    replayed: &'static str,
    /// What a replay passed over, after its count.
    skipped: &'static str,
}

/// Does what `action` asks with the records read from `topic`: rows
/// (`--json`), a table, a dry run, or `replay`, whose counts of replayed
/// and skipped records it prints.
async fn act<P>(
    action: &DlqCommand,
    topic: Topic,
    parked: Result<Vec<P>, KafkaError>,
    row: fn(&P) -> serde_json::Value,
    table: fn(&[P]),
    replay: impl AsyncFnOnce(&[P]) -> Result<(usize, usize), KafkaError>,
) -> ExitCode {
    let parked = match parked {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: reading {}: {e}", topic.name);
            return ExitCode::FAILURE;
        }
    };
    match action {
        DlqCommand::List { json: true, .. } => {
            for p in &parked {
                println!("{}", row(p));
            }
        }
        DlqCommand::List { .. } => table(&parked),
        DlqCommand::Replay { dry_run: true, .. } => {
            table(&parked);
            println!("dry run: nothing replayed");
        }
        DlqCommand::Replay { .. } => match replay(&parked).await {
            Ok((replayed, skipped)) => {
                println!("replayed {replayed} {}", topic.replayed);
                if skipped > 0 {
                    println!("skipped {skipped} {}", topic.skipped);
                }
            }
            Err(e) => {
                eprintln!("error: replaying: {e}");
                return ExitCode::FAILURE;
            }
        },
    }
    ExitCode::SUCCESS
}
