//! The binary's command-line contract: exit codes and error messages.

use std::process::Command;

use tests::binary;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn types_validate_accepts_the_shipped_definitions() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/event_types");
    let (code, out, err) = run(&["types", "validate", dir], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("event type definitions valid"), "{out}");
}

#[test]
fn types_validate_names_file_and_field_of_every_error() {
    let dir = std::env::temp_dir().join(tests::unique("types"));
    std::fs::create_dir_all(&dir).unwrap();
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/event_types/audit_operation.yml"))
            .unwrap();
    std::fs::write(dir.join("audit_operation.yml"), &good).unwrap();
    std::fs::write(dir.join("wrong_name.yml"), &good).unwrap();
    std::fs::write(
        dir.join("no_scope.yml"),
        good.replace("name: audit_operation", "name: no_scope").replace("scope:", "colour:"),
    )
    .unwrap();
    let (code, _, err) = run(&["types", "validate", dir.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("wrong_name.yml: field `name`"), "{err}");
    assert!(err.contains("no_scope.yml: field `scope`: is required"), "{err}");
    assert!(err.contains("no_scope.yml: field `colour`: is not a known field"), "{err}");
    assert!(!err.contains("audit_operation.yml"), "{err}");
    let (code, _, err) = run(&["types", "validate", "/nonexistent-dir"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read folder"), "{err}");
}

#[test]
fn bad_configuration_exits_64_before_touching_the_network() {
    let (code, _, err) = run(&["config", "check", "router"], &[("AUDITSTREAM_ROUTER__GROUP_IDD", "x")]);
    assert_eq!(code, 64);
    assert!(err.contains("group_idd"), "{err}");
    // A role with an invalid value stops at once, naming it.
    let (code, _, err) = run(&["producer"], &[("AUDITSTREAM_API__MAX_EVENTS", "0")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("api.max_events"), "{err}");
    let (code, _, err) = run(&["deliverer"], &[("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["soon"]"#)]);
    assert_eq!(code, 64);
    assert!(err.contains("soon"), "{err}");
    let (code, _, err) = run(&["deliverer"], &[("AUDITSTREAM_DELIVERER__RETRY_DELAYS", "[]")]);
    assert_eq!(code, 64);
    assert!(err.contains("retry_delays needs at least one delay"), "{err}");
    let (code, _, err) = run(&["router", "--config", "/nonexistent.toml"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent.toml"), "{err}");
    // Event-type definitions the role cannot use, named with the setting.
    let (code, _, err) = run(
        &["producer"],
        &[("AUDITSTREAM_AUTH__REQUIRED", "false"), ("AUDITSTREAM_API__TYPES_DIR", "/nonexistent-types")],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("api.types_dir: /nonexistent-types: cannot read folder"), "{err}");
    let dir = std::env::temp_dir().join(tests::unique("router-types"));
    std::fs::create_dir_all(&dir).unwrap();
    let good =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/event_types/audit_operation.yml"))
            .unwrap();
    std::fs::write(dir.join("wrong_name.yml"), good).unwrap();
    let (code, _, err) = run(&["router"], &[("AUDITSTREAM_ROUTER__TYPES_DIR", dir.to_str().unwrap())]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("router.types_dir: ") && err.contains("wrong_name.yml: field `name`"), "{err}");
    let (code, _, err) =
        run(&["config", "check", "router"], &[("AUDITSTREAM_ROUTER__TYPES_DIR", dir.to_str().unwrap())]);
    assert_eq!(code, 64, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let (code, out, _) = run(&["config", "check", "deliverer"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"));
}

#[test]
fn production_auth_needs_tokens() {
    let (code, _, err) = run(&["config", "check", "producer"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("auth.tokens is empty"), "{err}");
}

#[test]
fn a_busy_port_is_named_with_what_chose_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    // Dev mode binds before it starts anything, and names the flag.
    let (code, _, err) = run(&["dev", "--api", &addr], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot listen for the producer API (--api) on {addr}")), "{err}");
    let (code, _, err) = run(&["dev", "--api", "127.0.0.1:0", "--receiver", &addr], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot listen for the receiver (--receiver) on {addr}")), "{err}");
    // A role names the port it could not bind.
    let (code, _, err) = run(&["router"], &[("AUDITSTREAM_ADMIN__LISTEN", &addr)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("binding the admin port {addr}")), "{err}");
    let (code, _, err) = run(
        &["producer"],
        &[
            ("AUDITSTREAM_AUTH__REQUIRED", "false"),
            ("AUDITSTREAM_ADMIN__LISTEN", "127.0.0.1:0"),
            ("AUDITSTREAM_API__LISTEN", &addr),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("binding the API port {addr}")), "{err}");
}

#[test]
fn a_dead_letter_time_it_cannot_read_exits_64() {
    let (code, _, err) = run(&["dlq", "list", "--since", "soon"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("\"soon\" is neither an RFC 3339 time nor a duration like 2h"), "{err}");
}

#[test]
fn commands_refuse_arguments_they_cannot_use_with_exit_64() {
    // A key rotation's reseal has nothing to seal with.
    let (code, _, err) = run(&["reseal"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("reseal needs secrets.keys (AUDITSTREAM_SECRETS__KEYS)"), "{err}");
    // The reference receiver's expectations, each named; a secret that is
    // not valid is not echoed.
    let receiver = |extra: &[&str]| {
        let mut args = vec!["receiver", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        run(&args, &[])
    };
    let (code, _, err) = receiver(&["--expect", "siem"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--expect takes NAME=TOKEN, got \"siem\""), "{err}");
    let (code, _, err) = receiver(&["--expect", "siem=t0k3n", "--secret", "siem"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--secret takes NAME=whsec_<base64>"), "{err}");
    let (code, _, err) = receiver(&["--expect", "siem=t0k3n", "--secret", "siem=sw0rdf1sh"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--secret for \"siem\": the secret must start with whsec_"), "{err}");
    assert!(!err.contains("sw0rdf1sh"), "the secret is not echoed: {err}");
    let valid = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (code, _, err) = receiver(&["--expect", "siem=t0k3n", "--secret", &format!("logs={valid}")]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--secret names \"logs\", which no --expect names"), "{err}");
    assert!(!err.contains(valid), "the secret is not echoed: {err}");
}
