//! Golden vectors: every real payload in `tests/golden/` (copied from
//! `shared/examples/`) parses, validates, and comes out as the same JSON
//! value — and, being complete, as the very same bytes.

use proto::{EventLimits, Registry, event::prepare};

#[test]
fn every_example_round_trips() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let registry = Registry::embedded();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let prepared = prepare(&bytes, &registry, &EventLimits::default(), time::OffsetDateTime::now_utc())
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let before: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let after: serde_json::Value = serde_json::from_slice(&prepared.bytes).unwrap();
        assert_eq!(before, after, "{}", path.display());
        assert_eq!(prepared.bytes, String::from_utf8(bytes).unwrap().trim().as_bytes(), "{}", path.display());
        assert_eq!(prepared.event_type, before["event_type"]);
        seen += 1;
    }
    assert!(seen >= 9, "only {seen} golden files");
}

/// The copy in this repo matches the shared examples, when they are beside it.
#[test]
fn golden_copy_matches_shared_examples() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/examples");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let ours =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(path.file_name().unwrap());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&ours).unwrap_or_default(),
            "{} differs",
            path.display()
        );
    }
}
