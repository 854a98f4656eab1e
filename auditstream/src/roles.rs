//! The production roles: config → telemetry → listeners → run → drain.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use serde::{Serialize, de::DeserializeOwned};
use service::{Admin, ConfigError, config, shutdown, telemetry};
use tokio::net::TcpListener;

/// Exit status for a configuration error (`EX_USAGE`), returned before
/// touching the network.
pub const EXIT_CONFIG: u8 = 64;

/// Arguments of a role command.
#[derive(clap::Args)]
pub struct RoleArgs {
    /// A TOML config file; `AUDITSTREAM_*` variables override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

pub fn load<T: Serialize + DeserializeOwned + Default>(
    args: &RoleArgs,
    validate: impl Fn(&T) -> Result<(), ConfigError>,
) -> Result<T, ExitCode> {
    let loaded =
        config::load::<T>(args.config.as_deref(), config::process_env()).and_then(|c| validate(&c).map(|()| c));
    loaded.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped with an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the admin server and returns what the role needs.
async fn start_admin(listen: SocketAddr) -> anyhow::Result<(Admin, service::Shutdown)> {
    let admin = Admin::default();
    let shutdown = shutdown::on_signal();
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding the admin port {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin server listening");
    tokio::spawn(admin.clone().serve(listener, shutdown.clone()));
    Ok((admin, shutdown))
}

/// The steps every role shares: configuration (exit 64 when bad, before
/// touching the network), telemetry, the admin server, then the role itself
/// with the shutdown signal.
async fn role<C, F, Fut>(
    args: &RoleArgs,
    validate: impl Fn(&C) -> Result<(), ConfigError>,
    parts: impl Fn(&C) -> (&config::TelemetryConfig, SocketAddr),
    run: F,
) -> ExitCode
where
    C: Serialize + DeserializeOwned + Default + Send + 'static,
    F: FnOnce(C, Admin, service::Shutdown) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let cfg = match load::<C>(args, validate) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (telemetry_config, admin_listen) = parts(&cfg);
    telemetry::init(telemetry_config);
    // On a worker thread rather than the main thread: the consumer loops
    // spawn a task per message, and spawns from a worker stay on its local
    // queue instead of waking another thread each time.
    let work = tokio::spawn(async move {
        let (admin, shutdown) = start_admin(admin_listen).await?;
        run(cfg, admin, shutdown).await
    });
    finish(work.await.unwrap_or_else(|e| Err(anyhow::anyhow!("the role's task ended abnormally: {e}"))))
}

/// `auditstream producer`.
pub async fn producer(args: RoleArgs) -> ExitCode {
    use producer::ProducerConfig as C;
    role(
        &args,
        C::validate,
        |c: &C| (&c.telemetry, c.admin.listen),
        |cfg: C, admin, shutdown| async move {
            let api = TcpListener::bind(cfg.api.listen)
                .await
                .with_context(|| format!("binding the API port {}", cfg.api.listen))?;
            Ok(producer::run(cfg, admin, api, shutdown).await?)
        },
    )
    .await
}

/// `auditstream router`.
pub async fn router(args: RoleArgs) -> ExitCode {
    use router::RouterConfig as C;
    role(
        &args,
        C::validate,
        |c: &C| (&c.telemetry, c.admin.listen),
        |cfg, admin, shutdown| async move { Ok(router::run(cfg, admin, shutdown).await?) },
    )
    .await
}

/// `auditstream deliverer`.
pub async fn deliverer(args: RoleArgs) -> ExitCode {
    use deliverer::DelivererConfig as C;
    role(
        &args,
        C::validate,
        |c: &C| (&c.telemetry, c.admin.listen),
        |cfg, admin, shutdown| async move { Ok(deliverer::run(cfg, admin, shutdown).await?) },
    )
    .await
}

/// Arguments of `auditstream receiver`.
#[derive(clap::Args)]
pub struct ReceiverArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// A destination to accept: NAME=TOKEN (repeatable).
    #[arg(long = "expect", value_name = "NAME=TOKEN", required = true)]
    expect: Vec<String>,
    /// A signing secret to verify: NAME=whsec_… (repeatable).
    #[arg(long = "secret", value_name = "NAME=SECRET")]
    secrets: Vec<String>,
    /// Append every request to this NDJSON file.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Fault injection: share of requests (0 to 1) answered with --fail-status.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    fail_rate: f64,
    /// Fault injection: the status of injected failures.
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Fault injection: Retry-After seconds sent with injected failures.
    #[arg(long)]
    retry_after: Option<u64>,
    /// Fault injection: delay added to every answer (e.g. 200ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<std::time::Duration>,
    /// Fault injection: share of connections (0 to 1) reset at once.
    #[arg(long, default_value_t = 0.0, value_parser = share)]
    reset_rate: f64,
    /// Fault injection: reset every connection for this long after start (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    down_for: Option<std::time::Duration>,
}

fn share(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| format!("{text:?} is not a share from 0 to 1"))
}

impl ReceiverArgs {
    fn faults(&self) -> receiver::Faults {
        receiver::Faults {
            fail_rate: self.fail_rate,
            fail_status: self.fail_status,
            retry_after: self.retry_after,
            delay: self.delay.unwrap_or_default(),
            reset_rate: self.reset_rate,
            down_for: self.down_for,
            ..Default::default()
        }
    }
}

/// `auditstream receiver`.
pub async fn receiver(args: ReceiverArgs) -> ExitCode {
    let mut expected = Vec::new();
    for e in &args.expect {
        let Some((name, token)) = e.split_once('=') else {
            eprintln!("error: --expect takes NAME=TOKEN, got {e:?}");
            return ExitCode::from(EXIT_CONFIG);
        };
        expected.push(receiver::Expected { name: name.into(), token: token.into(), secret: None });
    }
    for s in &args.secrets {
        // The secret itself is never echoed.
        let Some((name, secret)) = s.split_once('=') else {
            eprintln!("error: --secret takes NAME=whsec_<base64>");
            return ExitCode::from(EXIT_CONFIG);
        };
        let secret = match proto::destination::SigningSecret::new(secret) {
            Ok(secret) => secret,
            Err(why) => {
                eprintln!("error: --secret for {name:?}: the secret {why}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        match expected.iter_mut().find(|e| e.name == name) {
            Some(e) => e.secret = Some(secret),
            None => {
                eprintln!("error: --secret names {name:?}, which no --expect names");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    telemetry::init(&config::TelemetryConfig { format: config::LogFormat::Pretty, filter: "info".into() });
    finish(
        async {
            let r = receiver::Receiver::new(receiver::ReceiverConfig {
                expected,
                log_file: args.log.clone(),
                print: true,
                faults: args.faults(),
            })
            .context("opening the receiver log")?;
            let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
            println!("receiver listening on http://{}", listener.local_addr()?);
            let mut stop = shutdown::on_signal();
            r.clone().serve(listener, async move { stop.wait().await }).await?;
            let s = r.stats();
            println!(
                "receiver stopped: {} unique, {} duplicates, {} rejected, {} faults injected",
                s.unique, s.duplicates, s.rejected, s.faults_injected
            );
            Ok(())
        }
        .await,
    )
}

/// `auditstream reseal`: rewrites every destination with its secrets sealed
/// under the current (first) key, the middle step of a key rotation.
pub async fn reseal(args: RoleArgs) -> ExitCode {
    let cfg = match load::<producer::ProducerConfig>(&args, |c| {
        c.kafka.validate()?;
        c.secrets.keyring().map(|_| ())
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let keyring = match cfg.secrets.keyring() {
        Ok(Some(k)) => k,
        _ => {
            eprintln!("error: reseal needs secrets.keys (AUDITSTREAM_SECRETS__KEYS), the new key first");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(&cfg.telemetry);
    finish(
        async {
            let topics = proto::topics::Topics::new(cfg.kafka.topic_prefix.clone());
            let admin = Admin::default();
            let (table, _) = service::table::follow(
                &cfg.kafka,
                &topics.destinations(),
                proto::destination::Directory::with_keyring(Some(keyring.clone())),
                admin.readiness.register("reseal"),
                service::Shutdown::never(),
            )
            .await?;
            table.wait_ready().await;
            let publisher = producer::Publisher::new(
                &cfg.kafka,
                proto::Registry::embedded(),
                Default::default(),
                cfg.api.publish_timeout,
            )?
            .with_keyring(Some(keyring.clone()));
            let all: Vec<_> = table.read().iter().cloned().collect();
            for d in &all {
                publisher.put_destination(d).await.with_context(|| format!("rewriting destination {}", d.id))?;
            }
            println!("resealed {} destinations with key {:?}", all.len(), keyring.current());
            Ok(())
        }
        .await,
    )
}

/// `auditstream types validate DIR`.
pub fn validate_types(dir: &std::path::Path) -> ExitCode {
    match proto::Registry::load_dir(dir) {
        Ok(r) => {
            println!("{} event type definitions valid in {}", r.len(), dir.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} problems found", errors.len());
            ExitCode::FAILURE
        }
    }
}

fn defaults_toml<T: Serialize + Default>() -> Result<String, String> {
    toml::to_string_pretty(&T::default()).map_err(|e| e.to_string())
}

/// `auditstream config defaults ROLE`.
pub fn print_defaults(role: &str) -> ExitCode {
    let text = match role {
        "producer" => defaults_toml::<producer::ProducerConfig>(),
        "router" => defaults_toml::<router::RouterConfig>(),
        _ => defaults_toml::<deliverer::DelivererConfig>(),
    };
    match text {
        Ok(t) => {
            println!("# auditstream {role}: defaults. Environment: AUDITSTREAM_<SECTION>__<KEY>.\n{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `auditstream config check ROLE`.
pub fn check_config(role: &str, args: &RoleArgs) -> ExitCode {
    let result = match role {
        "producer" => load::<producer::ProducerConfig>(args, producer::ProducerConfig::validate).map(|_| ()),
        "router" => load::<router::RouterConfig>(args, router::RouterConfig::validate).map(|_| ()),
        _ => load::<deliverer::DelivererConfig>(args, deliverer::DelivererConfig::validate).map(|_| ()),
    };
    match result {
        Ok(()) => {
            println!("{role} configuration is valid");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
