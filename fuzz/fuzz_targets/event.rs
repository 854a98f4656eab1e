//! Event parsing and validation (`proto::event`), the producer's and the
//! router's first contact with untrusted bytes.
//!
//! Invariants:
//! - `EventView::parse` and `prepare` never panic, whatever the bytes;
//! - when `prepare` accepts, its output is one JSON object holding every
//!   field of SPEC §1 (`proto::event::FIELDS`), with the id and type it
//!   reported — checked with serde_json whenever the input itself parses
//!   with it; with `FUZZ_STRICT_JSON=1`, for every accepted input (lone
//!   UTF-16 surrogate escapes and numbers beyond f64 used to pass in
//!   fields the producer does not read; docs/RELIABILITY.md, findings F1
//!   and F2, both fixed);
//! - when every field was present, the output is the input's exact bytes,
//!   trimmed of surrounding JSON whitespace;
//! - when fields were missing, the publisher's text follows the inserted
//!   completions unchanged.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use proto::{EventId, EventLimits, EventView, Registry, event::FIELDS};
use serde_json::Value;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::embedded)
}

fn json_trim(bytes: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = bytes.iter().position(|b| !ws(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ws(b)).map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

fn check(data: &[u8], accept_unknown_types: bool) {
    let now = time::macros::datetime!(2026-11-21 10:00:00.123 UTC);
    let limits = EventLimits { accept_unknown_types, ..EventLimits::default() };
    let view = EventView::parse(data);
    let Ok(prepared) = proto::event::prepare(data, registry(), &limits, now) else { return };
    let view = view.expect("prepare accepted what parse refused");

    let input = json_trim(data);
    let text = std::str::from_utf8(&prepared.bytes).expect("accepted event is not UTF-8");
    assert!(text.starts_with('{') && text.ends_with('}'), "accepted event is not an object: {text:?}");

    let strict = std::env::var_os("FUZZ_STRICT_JSON").is_some_and(|v| v == "1");
    let input_parses = serde_json::from_slice::<Value>(input).is_ok();
    if strict || input_parses {
        let value: Value = match serde_json::from_slice(&prepared.bytes) {
            Ok(v) => v,
            Err(e) => panic!("accepted event does not parse as JSON ({e}): {text:?}"),
        };
        let object = value.as_object().expect("accepted event is not a JSON object");
        for field in FIELDS {
            assert!(object.contains_key(field), "{field} missing from the output");
        }
        match (&prepared.id, &object["id"]) {
            (EventId::Int(i), Value::Number(n)) => assert_eq!(n.as_i64(), Some(*i)),
            (EventId::Str(s), Value::String(v)) => assert_eq!(s, v),
            (id, v) => panic!("reported id {id:?} but the output holds {v}"),
        }
        assert_eq!(object["event_type"].as_str(), Some(prepared.event_type.as_str()));
        assert_eq!(object["entity_id"].as_i64(), Some(prepared.entity_id));
    }

    let rewritten = view.created_at.as_deref().is_some_and(|at| !proto::event::is_canonical_timestamp(at));
    if rewritten {
        // created_at in another RFC 3339 form: rewritten in place in SPEC
        // §1's form, the same instant to the millisecond; all else as sent.
        if let (Ok(Value::Object(mut before)), Ok(Value::Object(mut after))) =
            (serde_json::from_slice::<Value>(input), serde_json::from_slice::<Value>(&prepared.bytes))
        {
            let (Some(Value::String(was)), Some(Value::String(now))) =
                (before.remove("created_at"), after.remove("created_at"))
            else {
                panic!("created_at lost in the rewrite: {text:?}")
            };
            assert!(proto::event::is_canonical_timestamp(&now), "rewritten as {now:?}");
            let (was, now) = (proto::event::timestamp_ms(&was), proto::event::timestamp_ms(&now));
            assert!(was.zip(now).is_some_and(|(a, b)| (a - b).abs() <= 1), "{was:?} became {now:?}");
            for field in view.missing.iter() {
                after.remove(field);
            }
            assert_eq!(before, after, "a field other than created_at changed");
        }
    } else if view.missing.is_empty() {
        assert_eq!(prepared.bytes, input, "a complete event must be stored exactly as received");
    } else {
        // `{` + completions + `,`? + the publisher's text after its `{`.
        assert!(prepared.bytes.ends_with(&input[1..]), "the publisher's text was changed");
        assert!(prepared.bytes.len() > input.len());
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, false);
    check(data, true);
});
