//! The end-to-end benchmark harness (issue 8).
//!
//! Starts the three roles of the real `auditstream` binary as separate
//! processes on a broker (a running one named by `--brokers`, else
//! librdkafka's in-process mock cluster), a fast sink in this process (an
//! HTTP server answering 200 that records, per delivery, the time from the
//! event's `created_at` to its arrival), seeds a namespace tree and
//! destinations, then publishes through the producer's HTTP API: a steady
//! load at `--rate` and a maximum-throughput run of `--max-events`. Beside
//! it, in the same run, two ceilings: (a) the broker's raw produce→consume
//! rate for the same messages with no processing, (b) the raw HTTP POST rate
//! to the same sink with the same payload and connection count, read before
//! every scenario and at the end; ratios are against the run's highest,
//! and beside them against the (b) read just before each scenario.
//!
//! Prints markdown tables: delivered events/s, latency percentiles, CPU
//! seconds per 1000 deliveries per role (from `/proc/<pid>/stat`), peak RSS
//! per role (`VmHWM`). `scripts/bench` wraps a default run on the real
//! broker. Not a test: it runs only when asked.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use axum::{extract::State, http::StatusCode};
use clap::{Parser, ValueEnum};
use proto::{
    destination::{Destination, Owner},
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use rdkafka::{mocking::MockCluster, producer::DefaultProducerContext};
use service::config::KafkaConfig;

/// Retry topics the deliverer is configured with (`retry_delays` below).
const RUNGS: usize = 2;
/// Partitions of every topic.
const PARTITIONS: i32 = 4;
/// Projects the events are spread over (the partition key is the entity).
const PROJECTS: i64 = 100;
/// The top-level group every project sits in.
const GROUP: i64 = 1;
/// Verification token of every destination.
const TOKEN: &str = "bench-token-0123456789";

/// Measures auditstream end to end beside the broker's and HTTP's own ceilings.
#[derive(Parser, Debug)]
struct Args {
    /// Bootstrap servers of a running broker; without it, librdkafka's
    /// in-process mock cluster.
    #[arg(long)]
    brokers: Option<String>,
    /// Pid of the broker process, to report its CPU and memory as well.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "one,three,dead,many")]
    scenarios: Vec<Scenario>,
    /// Steady-load rate, events/s.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Steady-load duration, seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Events published in the maximum-throughput run (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    max_events: u64,
    /// Events per publish request (a JSON array).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent connections, for publishing and for ceiling (b).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How the dead destination of the `dead` scenario fails.
    #[arg(long, value_enum, default_value = "error")]
    dead: Dead,
    /// Seconds each ceiling runs.
    #[arg(long, default_value_t = 5)]
    ceiling_seconds: u64,
    /// Skip the ceilings.
    #[arg(long)]
    no_ceilings: bool,
    /// Also measure (b′): ceiling (b)'s requests sent through the
    /// deliverer's own HTTP client (`deliverer::http::Sender`: its
    /// connection pool, timeout, fixed and per-delivery headers, bounded body read),
    /// to tell its cost from the rest of the deliverer's.
    #[arg(long)]
    client_ceiling: bool,
    /// Also measure (b) with its client in a process of its own, as a load
    /// tool runs: the same client, payload, sink and connection count. (b)
    /// drives the sink from the harness's own runtime, where a client's
    /// write and the sink's read can be served by one worker without
    /// crossing processes, which no load tool and no deliverer does.
    #[arg(long)]
    client_process: bool,
    /// The throughput target, in percent of the run's highest (b): after
    /// the last reading, (b) is paced at that rate and the harness prints
    /// what a delivery may cost there beyond two Kafka crossings and one
    /// POST (issue 8 asks for 50).
    #[arg(long, default_value_t = 50.0)]
    target: f64,
    /// Run only ceiling (b)'s client against the sink at this address for
    /// `--ceiling-seconds`, print "requests/s CPU-seconds" and exit (what
    /// `--client-process` starts).
    #[arg(long, hide = true)]
    post_to: Option<SocketAddr>,
    /// Rounds: every scenario (and a reading of the ceilings before it)
    /// this many times, with the median and range of each figure at the
    /// end. This machine's noise is ±25%: one round proves little.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// The `auditstream` binary.
    #[arg(long, default_value = "target/release/auditstream")]
    binary: PathBuf,
    /// Extra settings for a role, `ROLE:KEY=VALUE` (repeatable), e.g.
    /// `deliverer:AUDITSTREAM_DELIVERER__PER_DESTINATION_CONCURRENCY=128`.
    #[arg(long = "set")]
    settings: Vec<String>,
    /// Where the roles' logs go.
    #[arg(long, default_value = "target/bench-logs")]
    logs: PathBuf,
}

/// What is configured, and what each event matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// One destination per event.
    One,
    /// Three destinations per event.
    Three,
    /// One healthy destination and one dead one per event.
    Dead,
    /// 10,000 configured destinations, three matching each event.
    Many,
}

/// How the dead destination fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dead {
    /// Answers 503 at once.
    Error,
    /// Answers after 60 s (the deliverer's request timeout is 5 s).
    Slow,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(sink) = args.post_to {
        let rate = ceiling_http(sink, &sample_payload()?, args.connections, args.ceiling_seconds, None).await?;
        let cpu = cpu_seconds(std::process::id()).context("the client's CPU time")?;
        println!("{rate} {cpu}");
        return Ok(());
    }
    if !args.binary.exists() {
        bail!("{} is missing: run `cargo build --release -p auditstream`", args.binary.display());
    }
    std::fs::create_dir_all(&args.logs).context("log folder")?;
    let broker = Broker::new(args.brokers.clone(), args.broker_pid)?;
    let sink = Sink::start(StatusCode::OK, Duration::ZERO).await?;
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).build()?;
    let payload = sample_payload()?;

    let mut out = String::new();
    writeln!(out, "# auditstream bench\n")?;
    writeln!(
        out,
        "broker: {} · connections {} · batch {} · steady {} events/s for {} s · max run {} events · payload {} bytes\n",
        if broker.mock.is_some() { "librdkafka mock cluster (in the harness)" } else { broker.brokers.as_str() },
        args.connections,
        args.batch,
        args.rate,
        args.duration,
        args.max_events,
        payload.len()
    )?;

    // The ceilings are measured before every scenario and once at the end,
    // and every ratio uses the highest reading of the run: on this shared
    // machine (b) moves by a third between minutes, and a ceiling read in a
    // slow stretch would make the pipeline look closer to it than it is.
    // With the highest of several readings, a slow stretch would have to
    // last through all of them.
    let measure = || async {
        eprintln!("bench: ceilings");
        // (a)'s producer and consumer run in the harness; the broker in its
        // own process (or in the harness too, as a mock cluster).
        let cpu_a = || {
            let harness = cpu_seconds(std::process::id());
            match broker.pid.filter(|&p| p != std::process::id()) {
                Some(pid) => harness.zip(cpu_seconds(pid)).map(|(h, b)| h + b),
                None => harness,
            }
        };
        let a_before = cpu_a();
        let (a, a_messages) = ceiling_broker(&broker, &payload, args.ceiling_seconds).await?;
        let per_message = cpu_per(a_before, cpu_a(), a_messages as f64);
        // Client and sink both run in the harness: its CPU is the whole
        // cost of a request.
        let harness = || cpu_seconds(std::process::id());
        let requests = |rate: f64| rate * args.ceiling_seconds as f64;
        let cpu_before = harness();
        let b = ceiling_http(sink.addr, &payload, args.connections, args.ceiling_seconds, None).await?;
        let per_request = cpu_per(cpu_before, harness(), requests(b));
        let sender = if args.client_ceiling {
            let cpu_before = harness();
            let rate = ceiling_sender(sink.addr, &payload, args.connections, args.ceiling_seconds).await?;
            Some((rate, cpu_per(cpu_before, harness(), requests(rate))))
        } else {
            None
        };
        let process = if args.client_process {
            let cpu_before = harness();
            let (rate, client_cpu) = ceiling_http_process(sink.addr, args.connections, args.ceiling_seconds).await?;
            // The sink's CPU (the harness's) and the client process's.
            let sink_cpu = cpu_per(cpu_before, harness(), requests(rate));
            Some((rate, sink_cpu.map(|s| s + client_cpu * 1e6 / requests(rate).max(1.0))))
        } else {
            None
        };
        anyhow::Ok(Ceilings { a, b, per_message, per_request, sender, process })
    };
    let mut rows = Vec::new();
    let mut memory: Vec<(Scenario, Vec<Option<u64>>)> = Vec::new();
    // Each reading and what it was taken before.
    let mut readings: Vec<(String, Ceilings)> = Vec::new();
    for round in 1..=args.repeat {
        for &scenario in &args.scenarios {
            if !args.no_ceilings {
                readings.push((format!("round {round}, before {scenario:?}"), measure().await?));
            }
            eprintln!("bench: round {round}, scenario {scenario:?}");
            let (mut phases, rss) = run_scenario(&args, &broker, &sink, &client, scenario).await?;
            // What one POST costs at the rate the pipeline delivered: a
            // request costs more CPU below saturation (fewer requests per
            // wakeup) than at (b)'s flat-out rate.
            if let Some(max) = phases.iter_mut().find(|r| r.run == "max" && r.rate >= 1.0)
                && !args.no_ceilings
            {
                eprintln!("bench: (b) at {:.0} req/s", max.rate);
                let before = cpu_seconds(std::process::id());
                let reached =
                    ceiling_http(sink.addr, &payload, args.connections, args.ceiling_seconds, Some(max.rate)).await?;
                let per = cpu_per(before, cpu_seconds(std::process::id()), reached * args.ceiling_seconds as f64);
                max.paced = Some((reached, per));
            }
            // The (b) read just before this scenario (none with --no-ceilings).
            let b_before = readings.last().map(|(_, c)| c.b);
            rows.extend(phases.into_iter().map(|r| Row { round, b_before, ..r }));
            match memory.iter_mut().find(|(s, _)| *s == scenario) {
                // The peak over the rounds.
                Some((_, peak)) => {
                    for (p, r) in peak.iter_mut().zip(rss) {
                        *p = (*p).max(r);
                    }
                }
                None => memory.push((scenario, rss)),
            }
        }
    }
    if !args.no_ceilings {
        readings.push(("at the end".to_owned(), measure().await?));
    }
    // The run's highest (a) and (b): what every ratio is taken against.
    let highest = readings.iter().map(|(_, c)| (c.a, c.b)).reduce(|x, y| (x.0.max(y.0), x.1.max(y.1)));
    // One POST at the target's rate, and the cheapest Kafka crossing of the
    // run: together the least a delivery costs at the target.
    let budget = match highest {
        Some((_, best_b)) if args.target > 0.0 => {
            let rate = best_b * args.target / 100.0;
            eprintln!("bench: (b) at the target's pace, {rate:.0} req/s");
            let before = cpu_seconds(std::process::id());
            let reached = ceiling_http(sink.addr, &payload, args.connections, args.ceiling_seconds, Some(rate)).await?;
            let post = cpu_per(before, cpu_seconds(std::process::id()), reached * args.ceiling_seconds as f64);
            let kafka = readings.iter().filter_map(|(_, c)| c.per_message).min_by(f64::total_cmp);
            post.zip(kafka).map(|(post, kafka)| (reached, Budget::new(cores(), rate, kafka, post)))
        }
        _ => None,
    };

    if let Some((_, best_b)) = highest {
        let cpu = |c: Option<f64>| c.map_or("–".to_owned(), |p| format!("{p:.0}"));
        let sender = args.client_ceiling;
        let process = args.client_process;
        writeln!(
            out,
            "## Ceilings\n\n(a) the broker's produce→consume rate, same messages, no processing; (b) HTTP POST to the \
             sink, same payload, {} connections{}. CPU: µs per message ((a): producer, consumer and broker) or per \
             request (client and sink). Every ratio below is against the highest reading of the run. \
             The floor of this design: an event crosses Kafka twice and is POSTed once, so it costs at least \
             2 × (a) + (b) of CPU; on {} cores that caps delivered events/s, whatever the pipeline does.\n",
            args.connections,
            [
                (sender, "; (b′) the same through the deliverer's HTTP client"),
                (process, "; (b) from a process of its own: (b)'s client in another process, as a load tool runs"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, text)| *text)
            .collect::<String>(),
            cores()
        )?;
        writeln!(
            out,
            "| reading | (a) msg/s | (a) CPU µs | (b) req/s | (b) CPU µs |{}{} floor µs per event | at most events/s | at most vs the highest (b) |\n|---|---|---|---|---|{}{}---|---|---|",
            if sender { " (b′) req/s | (b′) CPU µs |" } else { "" },
            if process { " (b) from its own process, req/s | its CPU µs |" } else { "" },
            if sender { "---|---|" } else { "" },
            if process { "---|---|" } else { "" }
        )?;
        for (when, c) in &readings {
            let floor = c.floor();
            let most = floor.map(|f| cores() as f64 * 1e6 / f);
            let column = |reading: Option<(f64, Option<f64>)>, on: bool| match reading {
                Some((rate, per)) => format!(" {rate:.0} | {} |", cpu(per)),
                None if on => " – | – |".to_owned(),
                None => String::new(),
            };
            let b_prime = column(c.sender, sender) + &column(c.process, process);
            writeln!(
                out,
                "| {when} | {:.0} | {} | {:.0} | {} |{b_prime} {} | {} | {} |",
                c.a,
                c.per_message.map_or("–".to_owned(), |p| format!("{p:.1}")),
                c.b,
                cpu(c.per_request),
                floor.map_or("–".to_owned(), |f| format!("{f:.1}")),
                most.map_or("–".to_owned(), |m| format!("{m:.0}")),
                most.map_or("–".to_owned(), |m| format!("{:.1}%", 100.0 * m / best_b)),
            )?;
        }
        writeln!(out)?;
    }

    writeln!(out, "## Pipeline\n")?;
    writeln!(
        out,
        "Delivered = deliveries to healthy destinations (unique by event and destination). Latency: `created_at` \
         (set by the load generator, ms) → arrival at the sink. CPU: seconds per 1000 deliveries; harness = load \
         generator and sink; total = all five. vs (b) = against the run's highest (b); vs (b) before = against \
         the (b) read just before that scenario in that round, which a swing of the machine between readings moves \
         less.\n"
    )?;
    writeln!(
        out,
        "| round | scenario | run | published | accepted/s | delivered | delivered/s | vs (a) | vs (b) | vs (b) before | p50 ms | p95 ms | p99 ms | \
         CPU producer | CPU router | CPU deliverer | CPU broker | CPU harness | CPU total | set aside to retry |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let ratio = |c: Option<f64>| c.map_or("–".to_owned(), |c| format!("{:.1}%", 100.0 * r.rate / c));
        let cpu = |i: usize| r.cpu.get(i).copied().flatten().map_or("–".to_owned(), |c| format!("{c:.3}"));
        let total = r.total().map_or("–".to_owned(), |c| format!("{c:.3}"));
        writeln!(
            out,
            "| {} | {:?} | {} | {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.round,
            r.scenario,
            r.run,
            r.published,
            r.accepted_rate,
            r.delivered,
            r.rate,
            ratio(highest.map(|c| c.0)),
            ratio(highest.map(|c| c.1)),
            ratio(r.b_before),
            r.latency[0],
            r.latency[1],
            r.latency[2],
            cpu(0),
            cpu(1),
            cpu(2),
            cpu(3),
            cpu(4),
            total,
            r.retried,
        )?;
    }
    if rows.iter().any(|r| r.paced.is_some()) {
        writeln!(
            out,
            "\n## One POST at the pipeline's pace\n\nRight after each max run: (b)'s requests paced at the rate \
             that run delivered, over the same {} connections. Below saturation a request costs more CPU than at \
             (b)'s flat-out rate (fewer requests per wakeup), so this is what the HTTP exchange alone costs at the \
             pipeline's rate; beyond = the pipeline's CPU per delivery minus it.\n\n\
             | round | scenario | delivered/s | paced req/s | CPU µs per request | pipeline CPU µs per delivery | \
             beyond one POST |\n|---|---|---|---|---|---|---|",
            args.connections
        )?;
        for r in rows.iter().filter(|r| r.paced.is_some()) {
            let (reached, per) = r.paced.unwrap_or_default();
            let show = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0}"));
            writeln!(
                out,
                "| {} | {:?} | {:.0} | {reached:.0} | {} | {} | {} |",
                r.round,
                r.scenario,
                r.rate,
                show(per),
                show(r.total_us()),
                show(r.beyond_post()),
            )?;
        }
    }
    if args.repeat > 1 {
        writeln!(
            out,
            "\n## Over the {} rounds\n\nMedian (lowest–highest).\n\n\
             | scenario | run | delivered/s | vs (b) | vs (b) before | p99 ms | CPU total | CPU µs beyond one POST |\n\
             |---|---|---|---|---|---|---|---|",
            args.repeat
        )?;
        let mut seen = Vec::new();
        for r in &rows {
            if seen.contains(&(r.scenario, r.run)) {
                continue;
            }
            seen.push((r.scenario, r.run));
            let same: Vec<&Row> = rows.iter().filter(|x| x.scenario == r.scenario && x.run == r.run).collect();
            let spread = |values: Vec<f64>, show: &dyn Fn(f64) -> String| match summary(values) {
                Some((mid, low, high)) => format!("{} ({}–{})", show(mid), show(low), show(high)),
                None => "–".to_owned(),
            };
            let whole = |v: f64| format!("{v:.0}");
            let percent = |v: f64| format!("{v:.1}%");
            let cpu = |v: f64| format!("{v:.3}");
            writeln!(
                out,
                "| {:?} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.run,
                spread(same.iter().map(|x| x.rate).collect(), &whole),
                spread(same.iter().filter_map(|x| highest.map(|c| 100.0 * x.rate / c.1)).collect(), &percent),
                spread(same.iter().filter_map(|x| x.vs_b_before()).collect(), &percent),
                spread(same.iter().map(|x| x.latency[2] as f64).collect(), &whole),
                spread(same.iter().filter_map(|x| x.total()).collect(), &cpu),
                spread(same.iter().filter_map(|x| x.beyond_post()).collect(), &whole),
            )?;
        }
    }
    if let Some((reached, budget)) = &budget {
        writeln!(
            out,
            "\n## The {}% target on this machine\n\n{:.0} deliveries/s is {}% of the run's highest (b). On {} fully \
             busy cores a delivery may then cost {:.1} µs of CPU in all. One POST paced at that rate ({reached:.0} \
             req/s reached) cost {:.1} µs and a Kafka crossing at least {:.1} µs (the run's cheapest (a)); every \
             delivery crosses Kafka twice, which leaves **{:.1} µs per delivery** for all the rest: the producer's \
             HTTP ingress and validation, routing, the deliverer's consume and bookkeeping, and the load \
             generator. Beyond the floor = a max run's CPU per delivery minus one POST at its own pace and two \
             crossings.\n\n| round | scenario | CPU µs per delivery | one POST at its pace | 2 × (a) | beyond the \
             floor | room at the target |\n|---|---|---|---|---|---|---|",
            args.target,
            budget.rate,
            args.target,
            budget.cores,
            budget.whole(),
            budget.post,
            budget.kafka,
            budget.room(),
        )?;
        for r in rows.iter().filter(|r| r.paced.is_some()) {
            let show = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.1}"));
            let post = r.paced.and_then(|(_, per)| per);
            writeln!(
                out,
                "| {} | {:?} | {} | {} | {:.1} | {} | {:.1} |",
                r.round,
                r.scenario,
                show(r.total_us()),
                show(post),
                2.0 * budget.kafka,
                show(r.total_us().zip(post).map(|(total, post)| total - floor(budget.kafka, post))),
                budget.room(),
            )?;
        }
    }
    writeln!(
        out,
        "\n## Peak RSS (VmHWM), MiB\n\n| scenario | producer | router | deliverer | broker |\n|---|---|---|---|---|"
    )?;
    for (scenario, rss) in &memory {
        let m =
            |i: usize| rss.get(i).copied().flatten().map_or("–".to_owned(), |k| format!("{:.0}", k as f64 / 1024.0));
        writeln!(out, "| {scenario:?} | {} | {} | {} | {} |", m(0), m(1), m(2), m(3))?;
    }
    println!("{out}");
    Ok(())
}

/// The ceilings of one measurement: (a) and (b) rates, (a)'s CPU per
/// message (producer, consumer and broker) and (b)'s per request (client
/// and sink), in µs.
struct Ceilings {
    a: f64,
    b: f64,
    per_message: Option<f64>,
    per_request: Option<f64>,
    /// (b′), with `--client-ceiling`: requests/s and CPU µs per request.
    sender: Option<(f64, Option<f64>)>,
    /// (b) with its client in a process of its own, with
    /// `--client-process`: requests/s and CPU µs per request.
    process: Option<(f64, Option<f64>)>,
}

impl Ceilings {
    /// The least CPU a delivered event can cost on this design, in µs: it
    /// crosses Kafka twice (events, deliveries), each crossing at least an
    /// (a) message, and is POSTed once, at least a (b) request.
    fn floor(&self) -> Option<f64> {
        self.per_message.zip(self.per_request).map(|(a, b)| floor(a, b))
    }
}

/// The least CPU a delivery costs, in µs, given what one Kafka crossing
/// (`kafka`) and one POST (`post`) cost: two crossings and one POST.
fn floor(kafka: f64, post: f64) -> f64 {
    2.0 * kafka + post
}

/// What a throughput target leaves for the pipeline's own work, in µs of
/// CPU per delivery: at `rate` deliveries/s on `cores` fully busy cores a
/// delivery may cost `whole()`; two Kafka crossings (`kafka` each) and one
/// POST at that rate (`post`) are spent whatever the pipeline does.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Budget {
    cores: usize,
    rate: f64,
    kafka: f64,
    post: f64,
}

impl Budget {
    fn new(cores: usize, rate: f64, kafka: f64, post: f64) -> Self {
        Self { cores, rate, kafka, post }
    }

    /// The CPU one delivery may cost in all at the target's rate.
    fn whole(&self) -> f64 {
        self.cores as f64 * 1e6 / self.rate.max(1.0)
    }

    /// What is left of `whole()` after two crossings and one POST (negative
    /// when the target lies below this design's floor on this machine).
    fn room(&self) -> f64 {
        self.whole() - floor(self.kafka, self.post)
    }
}

/// CPU µs per operation from two readings of CPU seconds.
fn cpu_per(before: Option<f64>, after: Option<f64>, operations: f64) -> Option<f64> {
    before.zip(after).map(|(x, y)| (y - x) * 1e6 / operations.max(1.0))
}

/// Runs the workers of a ceiling to the end (each loops until the
/// deadline, counting what succeeded in `done`); `done` per second since
/// `start`.
async fn rate_of<W>(workers: Vec<W>, done: &AtomicU64, start: Instant) -> Result<f64>
where
    W: Future<Output = Result<()>> + Send + 'static,
{
    let tasks: Vec<_> = workers.into_iter().map(tokio::spawn).collect();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Median, lowest and highest (`None` when empty).
fn summary(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    let (low, high) = (*values.first()?, *values.last()?);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    Some((median, low, high))
}

/// One measured run of one scenario.
struct Row {
    /// Which round (`--repeat`) it belongs to.
    round: u32,
    scenario: Scenario,
    run: &'static str,
    published: u64,
    /// Events accepted per second while publishing.
    accepted_rate: f64,
    delivered: u64,
    rate: f64,
    /// p50, p95, p99 in ms.
    latency: [i64; 3],
    /// Producer, router, deliverer, broker, harness (load and sink).
    cpu: Vec<Option<f64>>,
    /// Deliveries the deliverer set aside to a retry topic during the run.
    retried: f64,
    /// Max runs: (b) paced at this run's delivered rate, right after it:
    /// requests/s reached and CPU µs per request.
    paced: Option<(f64, Option<f64>)>,
    /// (b) as read just before this scenario of this round, req/s.
    b_before: Option<f64>,
}

impl Row {
    /// The whole CPU, in seconds per 1000 deliveries (ms per delivery).
    fn total(&self) -> Option<f64> {
        self.cpu.iter().copied().sum::<Option<f64>>()
    }

    /// The whole CPU per delivery, in µs.
    fn total_us(&self) -> Option<f64> {
        self.total().map(|c| c * 1000.0)
    }

    /// Delivered/s as a share of the (b) read just before it, in percent.
    fn vs_b_before(&self) -> Option<f64> {
        self.b_before.map(|b| 100.0 * self.rate / b)
    }

    /// The CPU per delivery beyond one POST at this run's rate, in µs.
    fn beyond_post(&self) -> Option<f64> {
        self.total_us().zip(self.paced.and_then(|(_, per)| per)).map(|(t, p)| t - p)
    }
}

/// The broker: a running one, or a mock cluster kept alive here.
struct Broker {
    brokers: String,
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pid: Option<u32>,
}

impl Broker {
    /// The broker at `brokers` (its process `pid`, when known), else a mock
    /// cluster in this process (whose CPU then includes the load and the sink).
    fn new(brokers: Option<String>, pid: Option<u32>) -> Result<Self> {
        Ok(match brokers {
            Some(b) => Self { brokers: b, mock: None, pid },
            None => {
                let mock = MockCluster::new(1).context("mock cluster")?;
                Self { brokers: mock.bootstrap_servers(), mock: Some(mock), pid: Some(std::process::id()) }
            }
        })
    }

    fn kafka(&self, prefix: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic_prefix: prefix.into(),
            partitions: PARTITIONS,
            create_topics: false,
            ..KafkaConfig::default()
        }
    }

    async fn create(&self, prefix: &str, topics: &[(String, bool)]) -> Result<()> {
        match &self.mock {
            Some(mock) => {
                for (t, _) in topics {
                    mock.create_topic(t, PARTITIONS, 1).context("mock topic")?;
                }
            }
            None => service::kafka::ensure_topics(&self.kafka(prefix), topics).await.context("create topics")?,
        }
        Ok(())
    }

    /// Deletes a run's topics once it is over: a broker holding every
    /// earlier run's messages (Tansu's memory storage) grows, and its
    /// costs with it, which would tilt later rounds against earlier ones.
    async fn delete(&self, topics: &[(String, bool)]) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        if self.mock.is_some() {
            return;
        }
        let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
        let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
            service::kafka::base(&self.kafka("")).create();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let deleted = match &admin {
            Ok(admin) => admin.delete_topics(&names, &opts).await.map(|r| r.into_iter().filter(Result::is_ok).count()),
            Err(e) => Err(e.clone()),
        };
        match deleted {
            Ok(n) if n == names.len() => {}
            Ok(n) => eprintln!("bench: deleted {n} of {} topics", names.len()),
            Err(e) => eprintln!("bench: could not delete the run's topics: {e}"),
        }
    }
}

/// What the sink saw since the last reset.
#[derive(Default)]
struct Seen {
    /// Per request path (one per destination): what arrived there.
    paths: HashMap<String, PathSeen>,
    last: Option<Instant>,
}

impl Seen {
    /// What arrived for destinations: every path but ceiling (b)'s.
    fn destinations(&self) -> impl Iterator<Item = &PathSeen> {
        self.paths.iter().filter(|(path, _)| *path != RAW_PATH).map(|(_, p)| p)
    }
}

/// What arrived on one path.
#[derive(Default)]
struct PathSeen {
    /// Latencies, ms.
    latency: Vec<i64>,
    /// The event id of every delivery, to count unique ones: a UUID as its
    /// number (the producer mints UUIDs), any other id hashed.
    ids: HashSet<u128>,
}

/// The path ceiling (b) posts to; not a destination.
const RAW_PATH: &str = "/raw";

/// An event id as a number, without allocating.
fn id_number(id: &str) -> u128 {
    uuid::Uuid::try_parse(id).map_or_else(
        |_| {
            use std::hash::{BuildHasher as _, BuildHasherDefault};
            u128::from(BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id))
        },
        |u| u.as_u128(),
    )
}

/// A fast HTTP sink: answers `status` after `delay`, records what arrived.
struct Sink {
    addr: SocketAddr,
    status: StatusCode,
    delay: Duration,
    seen: Mutex<Seen>,
    requests: AtomicU64,
}

/// The text of a top-level string field of one of the harness's own
/// events, found by its `marker` (`"name":"`) rather than by parsing the JSON:
/// the sink shares the machine with the pipeline, and its costs count
/// against it. The events' nested fields never repeat these names
/// (`author_id`, `target_id` do not match `"id":"`).
fn field<'a>(body: &'a [u8], marker: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(marker)? + marker.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

impl Sink {
    async fn start(status: StatusCode, delay: Duration) -> Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sink = Arc::new(Self {
            addr: listener.local_addr()?,
            status,
            delay,
            seen: Mutex::default(),
            requests: AtomicU64::new(0),
        });
        let app = axum::Router::new().route("/{name}", axum::routing::post(take)).with_state(sink.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(sink)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reset(&self) {
        *self.seen() = Seen::default();
    }

    /// Unique deliveries to destinations (not ceiling (b)'s requests).
    fn unique(&self) -> u64 {
        self.seen().destinations().map(|p| p.ids.len() as u64).sum()
    }
}

/// Records every request the same way, ceiling (b)'s included, so the sink
/// costs the same per request in (b) as in the pipeline's runs; and
/// cheaply (no allocation once a path was seen): it shares the machine.
async fn take(State(sink): State<Arc<Sink>>, uri: http::Uri, body: bytes::Bytes) -> StatusCode {
    sink.requests.fetch_add(1, Relaxed);
    if !sink.delay.is_zero() {
        tokio::time::sleep(sink.delay).await;
    }
    let at = uri.path();
    let now = now_ms();
    let created = field(&body, r#""created_at":""#).and_then(proto::event::timestamp_ms);
    let id = id_number(field(&body, r#""id":""#).unwrap_or_default());
    let seen = &mut *sink.seen();
    if !seen.paths.contains_key(at) {
        seen.paths.insert(at.to_owned(), PathSeen::default());
    }
    if let Some(path) = seen.paths.get_mut(at) {
        if let Some(created) = created {
            path.latency.push(now - created);
        }
        path.ids.insert(id);
    }
    seen.last = Some(Instant::now());
    sink.status
}

/// The cores this process may run on.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One event as a service would send it: no `id` (the producer mints one),
/// `created_at` now.
fn event(project: i64, created_at: &str) -> String {
    format!(
        r#"{{"author_id":1,"entity_id":{project},"entity_type":"Project","details":{{"author_name":"example_user","target_id":132,"target_type":"MergeRequest","target_details":"Update test.md","custom_message":"Added merge request","ip_address":"127.0.0.1","entity_path":"bench-group/p{project}"}},"ip_address":"127.0.0.1","author_name":"Administrator","entity_path":"bench-group/p{project}","target_details":"Update test.md","created_at":"{created_at}","target_type":"MergeRequest","target_id":132,"event_type":"merge_request_create"}}"#
    )
}

/// The bytes the deliverer sends for one event (completed by `prepare`).
fn sample_payload() -> Result<Vec<u8>> {
    let now = time::OffsetDateTime::now_utc();
    let text = event(1000, &proto::event::format_timestamp(now));
    let prepared = proto::event::prepare(text.as_bytes(), &proto::Registry::embedded(), &Default::default(), now)
        .map_err(|e| anyhow::anyhow!("sample event invalid: {e:?}"))?;
    Ok(prepared.bytes.to_vec())
}

/// Ceiling (a): produce the same messages (same keys, the producer role's
/// client settings) to a fresh topic and consume them, for `seconds`.
/// Messages per second, and how many arrived.
async fn ceiling_broker(broker: &Broker, payload: &[u8], seconds: u64) -> Result<(f64, u64)> {
    use futures_util::StreamExt as _;
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{Consumer as _, StreamConsumer},
        producer::FutureRecord,
    };
    let prefix = format!("bench-raw-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let kafka = broker.kafka(&prefix);
    let topic = format!("{prefix}raw");
    broker.create(&prefix, &[(topic.clone(), false)]).await?;
    // The event path's settings, as the router and deliverer consume.
    let consumer: StreamConsumer = service::kafka::reader(&kafka, service::kafka::Path::Event)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let mut stream = consumer.stream();
        while let Some(m) = stream.next().await {
            if m.is_ok() {
                counter.fetch_add(1, Relaxed);
            }
        }
    });
    let producer = service::kafka::producer(&kafka, Duration::from_secs(30))?;
    let keys: Vec<String> = (0..PROJECTS).map(|p| proto::event::partition_key("Project", 1000 + p)).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    while Instant::now() < deadline {
        while in_flight.len() < 20_000 {
            let key = &keys[(sent % PROJECTS as u64) as usize];
            in_flight.push(producer.send(FutureRecord::to(&topic).key(key).payload(payload), Duration::from_secs(30)));
            sent += 1;
        }
        if let Some(Err((e, _))) = in_flight.next().await {
            bail!("raw produce failed: {e}");
        }
    }
    while let Some(r) = in_flight.next().await {
        if let Err((e, _)) = r {
            bail!("raw produce failed: {e}");
        }
    }
    let until = Instant::now() + Duration::from_secs(60);
    while received.load(Relaxed) < sent && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The clients go before their topic does: librdkafka 2.12 can crash
    // (SIGSEGV in `rd_kafka_metadata_update_op`) when a consumer's fetch
    // answer for a topic deleted under it names the topic by neither name
    // nor id, as Tansu's does. Awaiting the aborted task is what waits for
    // its consumer to be destroyed; `abort` alone only asks.
    reader.abort();
    let _ = reader.await;
    drop(in_flight);
    drop(producer);
    broker.delete(&[(topic, false)]).await;
    let received = received.load(Relaxed);
    Ok((received as f64 / elapsed, received))
}

/// Ceiling (b): POST `payload` to the sink from `connections` connections
/// for `seconds`; requests per second.
/// Ceiling (b): POSTs of the payload to the sink over `connections`
/// keep-alive connections, as fast as they go or, with `pace`, at that
/// many requests per second in all. Requests per second.
async fn ceiling_http(
    sink: SocketAddr,
    payload: &[u8],
    connections: usize,
    seconds: u64,
    pace: Option<f64>,
) -> Result<f64> {
    let body = bytes::Bytes::copy_from_slice(payload);
    let host = http::HeaderValue::from_str(&sink.to_string())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        // One keep-alive connection per task, driven by hyper itself: the
        // least a client can do per request, so the ceiling is not
        // lowered by a client's own layers.
        let stream = tokio::net::TcpStream::connect(sink).await?;
        stream.set_nodelay(true)?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let (body, host, done) = (body.clone(), host.clone(), done.clone());
        // Each connection's share of the pace; ticks missed between timer
        // wakeups (1 ms) fire at once, so the rate is kept.
        let mut tick = pace.map(|rate| tokio::time::interval(Duration::from_secs_f64(connections as f64 / rate)));
        workers.push(async move {
            while Instant::now() < deadline {
                if let Some(tick) = &mut tick {
                    tick.tick().await;
                }
                let mut request = http::Request::new(http_body_util::Full::new(body.clone()));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = http::Uri::from_static(RAW_PATH);
                let headers = request.headers_mut();
                headers.insert(http::header::HOST, host.clone());
                headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                let response = send.send_request(request).await.context("ceiling (b) request")?;
                let ok = response.status().is_success();
                // Read the (empty) body to the end, so the connection is free.
                http_body_util::BodyExt::collect(response.into_body()).await.context("ceiling (b) response")?;
                if ok {
                    done.fetch_add(1, Relaxed);
                }
            }
            anyhow::Ok(())
        });
    }
    rate_of(workers, &done, start).await
}

/// Ceiling (b) with its client in a process of its own: this binary,
/// started with `--post-to`. Requests/s and the client's CPU seconds.
async fn ceiling_http_process(sink: SocketAddr, connections: usize, seconds: u64) -> Result<(f64, f64)> {
    let output = tokio::process::Command::new(std::env::current_exe().context("the harness's own path")?)
        .args(["--post-to", &sink.to_string(), "--connections", &connections.to_string()])
        .args(["--ceiling-seconds", &seconds.to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("starting ceiling (b)'s client process")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "ceiling (b)'s client process failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(rate)), Some(Ok(cpu))) => Ok((rate, cpu)),
        _ => bail!("ceiling (b)'s client process printed {text:?}, not \"requests/s CPU-seconds\""),
    }
}

/// Ceiling (b′): ceiling (b)'s requests, from as many concurrent tasks,
/// sent with the deliverer's `Sender` (its pool opens a connection per
/// task). Requests per second.
async fn ceiling_sender(sink: SocketAddr, payload: &[u8], connections: usize, seconds: u64) -> Result<f64> {
    let settings = deliverer::config::DelivererSettings {
        allowed_networks: vec!["127.0.0.0/8".parse().map_err(|e| anyhow::anyhow!("{e}"))?],
        ..Default::default()
    };
    let sender = deliverer::http::Sender::new(&settings, None)?;
    let url = format!("http://{sink}{RAW_PATH}");
    let destination = proto::destination::Destination::http(
        "bench-client-ceiling",
        proto::destination::Owner::Instance,
        "client ceiling",
        &url,
        "bench-token-0123456789",
    )
    .map_err(|e| anyhow::anyhow!("client ceiling destination: {e}"))?;
    let destination = Arc::new(destination);
    let body = bytes::Bytes::copy_from_slice(payload);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let workers = (0..connections)
        .map(|_| {
            let (sender, destination, body, done) = (sender.clone(), destination.clone(), body.clone(), done.clone());
            async move {
                while Instant::now() < deadline {
                    match sender.attempt(&destination, "bench-client-ceiling", "merge_request_create", &body).await {
                        deliverer::http::Outcome::Delivered(_) => {
                            done.fetch_add(1, Relaxed);
                        }
                        failed => bail!("ceiling (b′) request failed: {failed:?}"),
                    }
                }
                anyhow::Ok(())
            }
        })
        .collect();
    rate_of(workers, &done, start).await
}

/// A role process, killed when dropped.
struct RoleProc {
    child: Child,
    admin: SocketAddr,
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn spawn_role(args: &Args, broker: &Broker, prefix: &str, role: &str, extra: &[(&str, String)]) -> Result<RoleProc> {
    let admin = free_addr()?;
    let log = std::fs::File::create(args.logs.join(format!("{prefix}{role}.log")))?;
    let mut cmd = Command::new(&args.binary);
    cmd.arg(role)
        .env("AUDITSTREAM_KAFKA__BROKERS", &broker.brokers)
        .env("AUDITSTREAM_KAFKA__TOPIC_PREFIX", prefix)
        .env("AUDITSTREAM_KAFKA__CREATE_TOPICS", "false")
        .env("AUDITSTREAM_KAFKA__PARTITIONS", PARTITIONS.to_string())
        .env("AUDITSTREAM_ADMIN__LISTEN", admin.to_string())
        .env("AUDITSTREAM_TELEMETRY__FILTER", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    for setting in &args.settings {
        if let Some((r, kv)) = setting.split_once(':')
            && r == role
            && let Some((k, v)) = kv.split_once('=')
        {
            cmd.env(k, v);
        }
    }
    let child = cmd.spawn().with_context(|| format!("start {role}"))?;
    Ok(RoleProc { child, admin })
}

/// Waits for the role's `/ready`. A role that exited fails at once: its
/// admin port may meanwhile answer for another process (a free port picked
/// here can be taken before the role binds it).
async fn wait_ready(client: &reqwest::Client, role: &mut RoleProc, what: &str) -> Result<()> {
    let url = format!("http://{}/ready", role.admin);
    let until = Instant::now() + Duration::from_secs(90);
    while Instant::now() < until {
        if let Some(status) = role.child.try_wait()? {
            bail!("{what} exited ({status}) before it was ready; see its log in the log folder");
        }
        if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} not ready after 90 s")
}

fn destination(id: &str, owner: Owner, url: &str) -> Result<Destination> {
    Destination::http(id, owner, id, url, TOKEN).map_err(anyhow::Error::msg)
}

/// Seeds the namespace tree and the scenario's destinations; returns how
/// many healthy deliveries each event makes.
async fn seed(kafka: &KafkaConfig, scenario: Scenario, sink: &Sink, dead: Option<&Sink>) -> Result<u64> {
    use futures_util::future::join_all;
    let publisher =
        producer::Publisher::new(kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(30))?;
    let group = NamespaceRecord { parent: None, full_path: "bench-group".into() };
    publisher.put_namespace(NamespaceRef::group(GROUP), Some(&group)).await?;
    let projects: Vec<_> = (0..PROJECTS)
        .map(|p| {
            (
                NamespaceRef::project(1000 + p),
                NamespaceRecord {
                    parent: Some(NamespaceRef::group(GROUP)),
                    full_path: format!("bench-group/p{}", 1000 + p),
                },
            )
        })
        .collect();
    for r in join_all(projects.iter().map(|(of, rec)| publisher.put_namespace(*of, Some(rec)))).await {
        r?;
    }
    let owner = Owner::Group { id: GROUP };
    let healthy = |n: usize| -> Result<Vec<Destination>> {
        (0..n).map(|i| destination(&format!("d{i}"), owner, &format!("http://{}/d{i}", sink.addr))).collect()
    };
    let mut destinations = match scenario {
        Scenario::One => healthy(1)?,
        Scenario::Three | Scenario::Many => healthy(3)?,
        Scenario::Dead => healthy(1)?,
    };
    if let (Scenario::Dead, Some(dead)) = (scenario, dead) {
        destinations.push(destination("dead", owner, &format!("http://{}/dead", dead.addr))?);
    }
    let matching = destinations.len() as u64 - u64::from(scenario == Scenario::Dead);
    if scenario == Scenario::Many {
        for i in 0..(10_000 - destinations.len()) {
            let owner = Owner::Group { id: 100_000 + i as i64 };
            destinations.push(destination(&format!("other{i}"), owner, &format!("http://{}/other", sink.addr))?);
        }
    }
    for chunk in destinations.chunks(1000) {
        for r in join_all(chunk.iter().map(|d| publisher.put_destination(d))).await {
            r?;
        }
    }
    Ok(matching)
}

/// The deliverer's finished deliveries by outcome (`delivered`, `retried`,
/// ...), from its `/metrics`: bounces to the retry topics show here.
async fn outcomes(client: &reqwest::Client, admin: SocketAddr) -> HashMap<String, f64> {
    let Ok(r) = client.get(format!("http://{admin}/metrics")).send().await else { return HashMap::new() };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("auditstream_deliverer_deliveries_total{outcome=\""))
        .filter_map(|l| {
            let (outcome, rest) = l.split_once('"')?;
            Some((outcome.to_owned(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Peak resident set, KiB.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Publishes `batches` batches (or until `until`), each connection pacing
/// one batch per `period` (zero: back to back). Returns events accepted.
async fn publish(
    client: &reqwest::Client,
    api: SocketAddr,
    args: &Args,
    batches: u64,
    period: Duration,
    until: Option<Instant>,
) -> Result<u64> {
    let url = format!("http://{api}/api/v1/events");
    let left = Arc::new(AtomicU64::new(batches));
    let accepted = Arc::new(AtomicU64::new(0));
    let batch = args.batch;
    let tasks: Vec<_> = (0..args.connections)
        .map(|c| {
            let (client, url, left, accepted) = (client.clone(), url.clone(), left.clone(), accepted.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period.max(Duration::from_nanos(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut seq = c as i64;
                loop {
                    if !period.is_zero() {
                        tick.tick().await;
                    }
                    if until.is_some_and(|u| Instant::now() >= u)
                        || left.fetch_update(Relaxed, Relaxed, |l| l.checked_sub(1)).is_err()
                    {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let at = proto::event::format_timestamp(time::OffsetDateTime::now_utc());
                    let mut body = String::with_capacity(batch * 640);
                    body.push('[');
                    for i in 0..batch {
                        if i > 0 {
                            body.push(',');
                        }
                        seq += 1;
                        body.push_str(&event(1000 + seq.rem_euclid(PROJECTS), &at));
                    }
                    body.push(']');
                    loop {
                        let r = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body.clone())
                            .send()
                            .await?;
                        if r.status().is_success() {
                            accepted.fetch_add(batch as u64, Relaxed);
                            break;
                        }
                        if r.status() != StatusCode::SERVICE_UNAVAILABLE {
                            bail!("publish answered {}: {}", r.status(), r.text().await.unwrap_or_default());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(accepted.load(Relaxed))
}

/// Waits until the sink saw `want` unique healthy deliveries, or nothing new
/// arrived for 20 s.
async fn drain(sink: &Sink, want: u64) -> u64 {
    let mut last = (0, Instant::now());
    loop {
        let n = sink.unique();
        if n >= want {
            return n;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(20) {
            eprintln!("bench: only {n} of {want} deliveries arrived");
            return n;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentiles(sink: &Sink) -> [i64; 3] {
    let mut all: Vec<i64> = sink.seen().destinations().flat_map(|p| p.latency.iter().copied()).collect();
    all.sort_unstable();
    let at = |p: f64| all.get(((all.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(-1);
    [at(0.50), at(0.95), at(0.99)]
}

async fn run_scenario(
    args: &Args,
    broker: &Broker,
    sink: &Arc<Sink>,
    client: &reqwest::Client,
    scenario: Scenario,
) -> Result<(Vec<Row>, Vec<Option<u64>>)> {
    let prefix = format!("bench-{:?}-{}.", scenario, &uuid::Uuid::new_v4().simple().to_string()[..8]).to_lowercase();
    let kafka = broker.kafka(&prefix);
    broker.create(&prefix, &Topics::new(&prefix).all(RUNGS)).await?;
    let dead = match (scenario, args.dead) {
        (Scenario::Dead, Dead::Error) => Some(Sink::start(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await?),
        (Scenario::Dead, Dead::Slow) => Some(Sink::start(StatusCode::OK, Duration::from_secs(60)).await?),
        _ => None,
    };
    let per_event = seed(&kafka, scenario, sink, dead.as_deref()).await?;

    let api = free_addr()?;
    let group = |r: &str| format!("{prefix}{r}");
    let mut producer = spawn_role(
        args,
        broker,
        &prefix,
        "producer",
        &[
            ("AUDITSTREAM_API__LISTEN", api.to_string()),
            ("AUDITSTREAM_AUTH__REQUIRED", "false".into()),
            ("AUDITSTREAM_RELAY__GROUP_ID", group("relay")),
        ],
    )?;
    let mut router = spawn_role(
        args,
        broker,
        &prefix,
        "router",
        &[("AUDITSTREAM_ROUTER__GROUP_ID", group("router")), ("AUDITSTREAM_ROUTER__SESSION_TIMEOUT", "6s".into())],
    )?;
    let mut deliverer = spawn_role(
        args,
        broker,
        &prefix,
        "deliverer",
        &[
            ("AUDITSTREAM_DELIVERER__GROUP_ID", group("deliverer")),
            ("AUDITSTREAM_DELIVERER__SESSION_TIMEOUT", "6s".into()),
            ("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["5s", "30s"]"#.into()),
            ("AUDITSTREAM_DELIVERER__REQUEST_TIMEOUT", "5s".into()),
        ],
    )?;
    for (role, name) in [(&mut producer, "producer"), (&mut router, "router"), (&mut deliverer, "deliverer")] {
        wait_ready(client, role, name).await?;
    }
    // The harness itself last: it publishes the load and runs the sink.
    let pids = [
        Some(producer.child.id()),
        Some(router.child.id()),
        Some(deliverer.child.id()),
        broker.pid,
        Some(std::process::id()),
    ];

    // Warm-up: consumer groups joined, connections open.
    sink.reset();
    let warm = publish(client, api, args, 2, Duration::ZERO, None).await?;
    drain(sink, warm * per_event).await;

    let mut rows = Vec::new();
    let steady_batches = args.rate * args.duration / args.batch as u64;
    let period = Duration::from_secs_f64(args.batch as f64 * args.connections as f64 / args.rate as f64);
    let runs = [
        ("steady", steady_batches, period, Some(Instant::now() + Duration::from_secs(args.duration + 30))),
        ("max", args.max_events / args.batch as u64, Duration::ZERO, None),
    ];
    for (run, batches, period, until) in runs {
        if batches == 0 {
            continue;
        }
        sink.reset();
        let retried_before = outcomes(client, deliverer.admin).await.get("retried").copied().unwrap_or(0.0);
        let before: Vec<_> = pids.iter().map(|p| p.and_then(cpu_seconds)).collect();
        let start = Instant::now();
        let published = publish(client, api, args, batches, period, until).await?;
        let accepted_rate = published as f64 / start.elapsed().as_secs_f64();
        let delivered = drain(sink, published * per_event).await;
        let end = sink.seen().last.unwrap_or_else(Instant::now);
        let after: Vec<_> = pids.iter().map(|p| p.and_then(cpu_seconds)).collect();
        let cpu = before
            .iter()
            .zip(&after)
            .map(|(b, a)| Some((a.as_ref()? - b.as_ref()?) * 1000.0 / delivered.max(1) as f64))
            .collect();
        let rate = delivered as f64 / end.duration_since(start).as_secs_f64();
        let retried = outcomes(client, deliverer.admin).await.get("retried").copied().unwrap_or(0.0) - retried_before;
        eprintln!("bench: {scenario:?} {run}: {published} published, {delivered} delivered, {rate:.0}/s");
        rows.push(Row {
            round: 0,
            scenario,
            run,
            published,
            accepted_rate,
            delivered,
            rate,
            latency: percentiles(sink),
            cpu,
            retried,
            paced: None,
            b_before: None,
        });
    }
    // Each role's metrics at the end, for a closer look (lag, histograms).
    for (role, name) in [(&producer, "producer"), (&router, "router"), (&deliverer, "deliverer")] {
        if let Ok(r) = client.get(format!("http://{}/metrics", role.admin)).send().await {
            let _ =
                std::fs::write(args.logs.join(format!("{prefix}{name}.metrics")), r.text().await.unwrap_or_default());
        }
    }
    let rss = pids[..4].iter().map(|p| p.and_then(peak_rss)).collect();
    drop((producer, router, deliverer));
    broker.delete(&Topics::new(&prefix).all(RUNGS)).await;
    Ok((rows, rss))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's share of the (b) read just before it is its own reading's,
    /// and there is none when the ceilings were not read (`--no-ceilings`).
    #[test]
    fn a_run_is_read_against_the_b_just_before_it() {
        let row = |rate, b_before| Row {
            round: 1,
            scenario: Scenario::One,
            run: "max",
            published: 0,
            accepted_rate: 0.0,
            delivered: 0,
            rate,
            latency: [0; 3],
            cpu: Vec::new(),
            retried: 0.0,
            paced: None,
            b_before,
        };
        assert_eq!(row(30_000.0, Some(75_000.0)).vs_b_before(), Some(40.0));
        assert_eq!(row(30_000.0, None).vs_b_before(), None);
    }

    /// At 50,000 deliveries/s two cores allow 40 µs per delivery; two
    /// crossings of 6 µs and a 23 µs POST leave 5. A slower machine's
    /// costs leave less than nothing, and that is shown, not clamped.
    #[test]
    fn the_target_leaves_what_two_crossings_and_a_post_do_not_take() {
        let budget = Budget::new(2, 50_000.0, 6.0, 23.0);
        assert_eq!(budget.whole(), 40.0);
        assert_eq!(budget.room(), 5.0);
        assert_eq!(Budget::new(2, 50_000.0, 9.0, 25.0).room(), -3.0);
    }

    /// Ceiling (a) deletes its topic once a reading is over, and a `--repeat`
    /// run reads it again and again. Its consumer must be gone before its
    /// topic is: librdkafka crashed the harness (SIGSEGV, which fails this
    /// test binary) on Tansu's fetch answer for the topic deleted under it.
    /// With `AUDITSTREAM_TEST_BROKERS` unset this runs on the mock cluster,
    /// where nothing is deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ceiling_a_reads_again_after_deleting_its_topic() {
        let broker = Broker::new(::tests::real_brokers(), None).expect("broker");
        let payload = event(1000, &proto::event::format_timestamp(time::OffsetDateTime::now_utc()));
        for reading in 1..=6 {
            let (rate, received) = ceiling_broker(&broker, payload.as_bytes(), 1).await.expect("ceiling (a)");
            assert!(received > 0 && rate > 0.0, "reading {reading}: {received} received at {rate}/s");
        }
    }
}
