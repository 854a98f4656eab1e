//! `auditstream publish FILE|-`: publishes events from a JSON object, a JSON
//! array or NDJSON, through the producer API or straight to Kafka, with a
//! progress bar on large inputs and a summary at the end.

use std::{io::Read, io::Write, path::PathBuf, process::ExitCode, time::Instant};

use serde_json::{Value, value::RawValue};

use crate::roles::{EXIT_CONFIG, RoleArgs};

/// Arguments of `auditstream publish`.
#[derive(clap::Args)]
pub struct PublishArgs {
    /// The events: a file, or `-` for standard input.
    input: PathBuf,
    /// The producer API (ignored with --kafka).
    #[arg(long, env = "AUDITSTREAM_API_URL", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Bearer token for the API.
    #[arg(long, env = "AUDITSTREAM_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Publish straight to Kafka with the Rust client library, using the
    /// producer configuration (--config and AUDITSTREAM_* variables).
    #[arg(long)]
    kafka: bool,
    /// Events per API request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// How many times to resend a request the API could not take (503, or
    /// no answer), waiting 2, 4, 8, … s (at most 64 s) between; after the
    /// last, stop.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    #[command(flatten)]
    role: RoleArgs,
}

/// Splits the input into event texts: a JSON array, one JSON object (even
/// spread over lines), or NDJSON.
fn split(input: &[u8]) -> Result<Vec<&[u8]>, String> {
    let first = input.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Ok(Vec::new()),
        Some(b'[') => serde_json::from_slice::<Vec<&RawValue>>(input)
            .map(|items| items.into_iter().map(|r| r.get().as_bytes()).collect())
            .map_err(|e| format!("the input is not a JSON array of events: {e}")),
        Some(_) if serde_json::from_slice::<&RawValue>(input).is_ok() => Ok(vec![input]),
        Some(_) => Ok(input
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect()),
    }
}

struct Progress {
    total: usize,
    done: usize,
    shown: bool,
    last_decile: usize,
    terminal: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        use std::io::IsTerminal;
        Self { total, done: 0, shown: total >= 1000, last_decile: 0, terminal: std::io::stderr().is_terminal() }
    }

    fn advance(&mut self, n: usize) {
        self.done += n;
        if !self.shown {
            return;
        }
        let pct = self.done * 100 / self.total.max(1);
        if self.terminal {
            let filled = pct / 4;
            eprint!("\r[{}{}] {pct:>3}% {}/{}", "#".repeat(filled), ".".repeat(25 - filled), self.done, self.total);
            let _ = std::io::stderr().flush();
        } else if pct / 10 > self.last_decile {
            self.last_decile = pct / 10;
            eprintln!("{pct}% ({}/{})", self.done, self.total);
        }
    }

    fn finish(&self) {
        if self.shown && self.terminal {
            eprintln!();
        }
    }
}

/// What happened to each event.
#[derive(Default)]
struct Summary {
    published: usize,
    rejected: Vec<(usize, String)>,
    failed: usize,
}

fn read_input(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(path)
    }
}

/// `auditstream publish`.
pub async fn run(args: PublishArgs) -> ExitCode {
    let input = match read_input(&args.input) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.input.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let events = match split(&input) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.batch == 0 {
        eprintln!("error: --batch must be at least 1");
        return ExitCode::from(EXIT_CONFIG);
    }
    let started = Instant::now();
    let mut progress = Progress::new(events.len());
    let summary = if args.kafka {
        match via_kafka(&args, &events, &mut progress).await {
            Ok(s) => s,
            Err(code) => return code,
        }
    } else {
        via_api(&args, &events, &mut progress).await
    };
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "published {} of {} events in {secs:.1} s ({:.0} events/s); {} rejected, {} not acknowledged",
        summary.published,
        events.len(),
        summary.published as f64 / secs.max(0.001),
        summary.rejected.len(),
        summary.failed
    );
    for (index, why) in summary.rejected.iter().take(10) {
        println!("  event {index}: {why}");
    }
    if summary.rejected.len() > 10 {
        println!("  … and {} more", summary.rejected.len() - 10);
    }
    if summary.rejected.is_empty() && summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn via_kafka(args: &PublishArgs, events: &[&[u8]], progress: &mut Progress) -> Result<Summary, ExitCode> {
    let config = crate::roles::load::<producer::ProducerConfig>(&args.role, |c| c.kafka.validate())?;
    let registry = proto::Registry::with_dir(config.api.types_dir.as_deref()).map_err(|e| {
        eprintln!("error: event type definitions: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    let limits = proto::EventLimits {
        max_event_bytes: config.api.max_event_bytes,
        accept_unknown_types: config.api.accept_unknown_types,
    };
    let publisher =
        producer::Publisher::new(&config.kafka, registry, limits, config.api.publish_timeout).map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        })?;
    let mut summary = Summary::default();
    for (chunk_no, chunk) in events.chunks(args.batch).enumerate() {
        let sends = chunk.iter().enumerate().map(|(i, e)| {
            let publisher = &publisher;
            async move { (chunk_no * args.batch + i, publisher.publish(e).await) }
        });
        for (index, result) in futures_util::future::join_all(sends).await {
            match result {
                Ok(_) => summary.published += 1,
                Err(producer::PublishError::Invalid(errors)) => {
                    summary.rejected.push((index, proto::event::FieldError::join(&errors)))
                }
                Err(e) => {
                    summary.failed += 1;
                    if summary.failed == 1 {
                        eprintln!("warning: {e}");
                    }
                }
            }
        }
        progress.advance(chunk.len());
    }
    Ok(summary)
}

async fn via_api(args: &PublishArgs, events: &[&[u8]], progress: &mut Progress) -> Summary {
    let client = crate::api_client::client();
    let url = format!("{}/api/v1/events", args.api.trim_end_matches('/'));
    let mut summary = Summary::default();
    for (chunk_no, chunk) in events.chunks(args.batch).enumerate() {
        // Indexes (in the input) still to send in this chunk.
        let mut pending: Vec<usize> = (0..chunk.len()).map(|i| chunk_no * args.batch + i).collect();
        // Counted as not acknowledged when the run stops at this chunk.
        let after_chunk = events.len() - (chunk_no * args.batch + chunk.len());
        let mut tries = 0;
        while !pending.is_empty() {
            let mut body = b"[".to_vec();
            for (n, index) in pending.iter().enumerate() {
                if n > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(events[*index]);
            }
            body.push(b']');
            let mut req = client.post(&url).header("content-type", "application/json").body(body);
            if let Some(t) = &args.token {
                req = req.bearer_auth(t);
            }
            let (status, answer) = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    (
                        status,
                        r.text().await.ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).unwrap_or(Value::Null),
                    )
                }
                Err(e) => (0, Value::String(format!("cannot reach {url}: {e}"))),
            };
            match status {
                202 => {
                    summary.published += pending.len();
                    pending.clear();
                }
                422 => {
                    // The API publishes none of a request with an invalid
                    // event: set the invalid ones aside and send the rest.
                    let bad: Vec<(usize, String)> = answer["error"]["events"]
                        .as_array()
                        .map(|list| {
                            list.iter()
                                .filter_map(|e| {
                                    let i = e["index"].as_u64()? as usize;
                                    let why = e["errors"]
                                        .as_array()
                                        .map(|errs| {
                                            errs.iter()
                                                .map(|x| {
                                                    format!(
                                                        "{}: {}",
                                                        x["field"].as_str().unwrap_or(""),
                                                        x["problem"].as_str().unwrap_or("")
                                                    )
                                                })
                                                .collect::<Vec<_>>()
                                                .join("; ")
                                        })
                                        .unwrap_or_default();
                                    Some((*pending.get(i)?, why))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    if bad.is_empty() {
                        summary.rejected.extend(pending.drain(..).map(|i| (i, answer["error"]["message"].to_string())));
                    } else {
                        pending.retain(|i| !bad.iter().any(|(b, _)| b == i));
                        summary.rejected.extend(bad);
                    }
                }
                503 | 0 => {
                    // Resend only what Kafka did not take (all of it when
                    // no answer came back).
                    if let Some(failed) = answer["error"]["failed_indexes"].as_array() {
                        let keep: Vec<usize> =
                            failed.iter().filter_map(|f| pending.get(f.as_u64()? as usize).copied()).collect();
                        summary.published += pending.len() - keep.len();
                        pending = keep;
                    }
                    let why = match answer.as_str() {
                        Some(unreachable) => unreachable.to_owned(),
                        None => format!("the API answered {status}: {}", message(&answer)),
                    };
                    if tries == args.retries {
                        // The next request would most likely fare the same:
                        // stop, and count what was not sent as not
                        // acknowledged.
                        eprintln!("error: {why}; gave up after {tries} retries");
                        summary.failed += pending.len() + after_chunk;
                        return summary;
                    }
                    tries += 1;
                    let wait = 1u64 << tries.min(6);
                    eprintln!("warning: {why}; resending {} events in {wait} s", pending.len());
                    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                }
                401 | 403 => {
                    // Every later request would be refused the same way:
                    // stop, and count what was not sent as not acknowledged.
                    eprintln!("error: the API refused the token ({status}): {}", message(&answer));
                    summary.failed += pending.len() + after_chunk;
                    return summary;
                }
                _ => {
                    summary.failed += pending.len();
                    if summary.failed == pending.len() {
                        eprintln!("warning: the API answered {status}: {}", message(&answer));
                    }
                    pending.clear();
                }
            }
        }
        progress.advance(chunk.len());
    }
    summary
}

/// The API's error message, or the whole answer when it has none.
fn message(answer: &Value) -> String {
    answer["error"]["message"].as_str().map_or_else(|| answer.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_arrays_objects_and_ndjson() {
        assert_eq!(split(b" [ {\"a\":1}, {\"b\":2} ]").unwrap().len(), 2);
        assert_eq!(split(b"{\n  \"a\": 1\n}\n").unwrap().len(), 1, "a pretty-printed object is one event");
        assert_eq!(split(b"{\"a\":1}\n\n{\"b\":2}\r\n").unwrap().len(), 2);
        assert!(split(b"   ").unwrap().is_empty());
        assert!(split(b"[1,").unwrap_err().contains("not a JSON array"));
    }
}
