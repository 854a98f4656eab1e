//! `auditstream destinations list|create|update|delete`: the destinations
//! API from the command line, as readable tables or `--json` for scripts.

use std::process::ExitCode;

use serde_json::{Map, Value, json};

/// Where and as whom.
#[derive(clap::Args)]
pub struct Target {
    /// The producer API.
    #[arg(long, env = "AUDITSTREAM_API_URL", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Bearer token (instance admin, or owner of the group).
    #[arg(long, env = "AUDITSTREAM_API_TOKEN", hide_env_values = true)]
    token: String,
    /// A top-level group's destinations (default: the instance's).
    #[arg(long)]
    group: Option<i64>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Settings of a destination, for create and update.
#[derive(clap::Args)]
pub struct Settings {
    /// Its name (at most 72 characters, unique within the owner).
    #[arg(long)]
    name: Option<String>,
    /// Where events are POSTed.
    #[arg(long)]
    url: Option<String>,
    /// Verification token (create only; generated when absent).
    #[arg(long)]
    verification_token: Option<String>,
    /// Standard Webhooks signing secret (`whsec_…`); on update it rotates.
    #[arg(long)]
    signing_secret: Option<String>,
    /// A custom header NAME=VALUE (repeatable; replaces the list on update).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Allow only these event types or `category:<name>` (repeatable).
    #[arg(long = "allow", conflicts_with = "deny")]
    allow: Vec<String>,
    /// Deny these event types or `category:<name>` (repeatable).
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Namespace filter `group:ID` or `project:ID` (repeatable, at most 5).
    #[arg(long = "namespace", value_name = "KIND:ID")]
    namespaces: Vec<String>,
    /// Active or not.
    #[arg(long)]
    active: Option<bool>,
}

/// The commands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List destinations.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Create a destination.
    Create {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        settings: Settings,
    },
    /// Change a destination (only what is given).
    Update {
        /// The destination id.
        id: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        settings: Settings,
    },
    /// Delete a destination.
    Delete {
        /// The destination id.
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

impl Target {
    fn url(&self, id: Option<&str>) -> String {
        let base = self.api.trim_end_matches('/');
        let collection = match self.group {
            Some(g) => format!("{base}/api/v1/groups/{g}/destinations"),
            None => format!("{base}/api/v1/instance/destinations"),
        };
        match id {
            Some(id) => format!("{collection}/{id}"),
            None => collection,
        }
    }
}

impl Settings {
    fn body(&self) -> Result<Value, String> {
        let mut b = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                b.insert(k.into(), v);
            }
        };
        put("name", self.name.clone().map(Value::from));
        put("url", self.url.clone().map(Value::from));
        put("verification_token", self.verification_token.clone().map(Value::from));
        put("signing_secret", self.signing_secret.clone().map(Value::from));
        put("active", self.active.map(Value::from));
        if !self.headers.is_empty() {
            let list = self
                .headers
                .iter()
                .map(|h| {
                    h.split_once('=')
                        .map(|(n, v)| json!({ "name": n, "value": v }))
                        .ok_or(format!("--header takes NAME=VALUE, got {h:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            b.insert("headers".into(), Value::Array(list));
        }
        if !self.allow.is_empty() {
            b.insert("event_type_filters".into(), json!({ "allow": self.allow }));
        } else if !self.deny.is_empty() {
            b.insert("event_type_filters".into(), json!({ "deny": self.deny }));
        }
        if !self.namespaces.is_empty() {
            let list = self
                .namespaces
                .iter()
                .map(|n| {
                    let r: proto::namespace::NamespaceRef = n.parse()?;
                    Ok(json!({ "kind": r.kind.as_str(), "id": r.id }))
                })
                .collect::<Result<Vec<_>, String>>()?;
            b.insert("namespace_filters".into(), Value::Array(list));
        }
        Ok(Value::Object(b))
    }
}

fn table(rows: &[Value]) {
    println!("{:<38} {:<24} {:<8} {:<6} {:<40} FILTERS", "ID", "NAME", "OWNER", "ACTIVE", "URL");
    for d in rows {
        let owner = match d["owner"]["kind"].as_str() {
            Some("group") => format!("group:{}", d["owner"]["id"]),
            _ => "instance".into(),
        };
        let types = match (&d["event_type_filters"]["allow"], &d["event_type_filters"]["deny"]) {
            (Value::Array(a), _) if !a.is_empty() => format!("allow {}", a.len()),
            (_, Value::Array(d)) if !d.is_empty() => format!("deny {}", d.len()),
            _ => "all types".into(),
        };
        let namespaces = d["namespace_filters"].as_array().map_or(0, Vec::len);
        println!(
            "{:<38} {:<24} {:<8} {:<6} {:<40} {types}, {namespaces} namespaces",
            d["id"].as_str().unwrap_or(""),
            d["name"].as_str().unwrap_or(""),
            owner,
            d["active"],
            d["url"].as_str().unwrap_or("")
        );
    }
}

fn report_error(status: u16, body: &Value) -> ExitCode {
    let message = body["error"]["message"].as_str().unwrap_or("request failed");
    eprintln!("error ({status}): {message}");
    if let Some(errors) = body["error"]["errors"].as_array() {
        for e in errors {
            eprintln!("  {}: {}", e["field"].as_str().unwrap_or(""), e["problem"].as_str().unwrap_or(""));
        }
    }
    ExitCode::FAILURE
}

/// Runs a `destinations` command.
pub async fn run(command: Command) -> ExitCode {
    let client = crate::api_client::client();
    let (target, request) = match &command {
        Command::List { target } => (target, client.get(target.url(None))),
        Command::Create { target, settings } | Command::Update { target, settings, .. } => {
            let body = match settings.body() {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(crate::roles::EXIT_CONFIG);
                }
            };
            let req = match &command {
                Command::Update { id, .. } => client.patch(target.url(Some(id))),
                _ => client.post(target.url(None)),
            };
            (target, req.header("content-type", "application/json").body(body.to_string()))
        }
        Command::Delete { id, target } => (target, client.delete(target.url(Some(id)))),
    };
    let response = match request.bearer_auth(&target.token).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot reach {}: {e}", target.api);
            return ExitCode::FAILURE;
        }
    };
    let status = response.status().as_u16();
    let body: Value = response.text().await.ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        return report_error(status, &body);
    }
    match (&command, target.json) {
        (Command::Delete { id, .. }, false) => println!("deleted {id}"),
        (Command::Delete { .. }, true) => println!("{{}}"),
        (_, true) => println!("{body}"),
        (Command::List { .. }, false) => table(body["destinations"].as_array().map_or(&[][..], Vec::as_slice)),
        (_, false) => {
            table(std::slice::from_ref(&body));
            println!("verification token: {}", body["verification_token"].as_str().unwrap_or(""));
        }
    }
    ExitCode::SUCCESS
}
