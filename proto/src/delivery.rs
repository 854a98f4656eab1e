//! The delivery envelope: one Kafka record per (event, destination).
//!
//! The record's value is the event's bytes, unchanged; its key is the
//! destination id. A fresh delivery, as the router writes it, has no
//! headers at all: its event id, type and `created_at` are the event's own,
//! read from the value ([`DeliveryMeta::read`]). Kafka clients allocate per
//! header on both sides; headers were a quarter of the router's CPU.
//!
//! Once attempted, a delivery travels with headers ([`DeliveryMeta::to_headers`]):
//! the attempt count, when it is due, its history. Headers are written only
//! when they say something. Records written by earlier releases carry the
//! event's id and type as headers (and some the destination, as
//! [`H_DESTINATION`]); they are still read.

use serde::{Deserialize, Serialize};

/// Header: destination id. No longer written (the record key is the
/// destination id); read when present, as on records written before.
pub const H_DESTINATION: &str = "auditstream-destination-id";
/// Header: event id.
pub const H_EVENT_ID: &str = "auditstream-event-id";
/// Header: event type.
pub const H_EVENT_TYPE: &str = "auditstream-event-type";
/// Header: attempts made before this record; absent = 0.
pub const H_ATTEMPT: &str = "auditstream-attempt";
/// Header: when the next attempt is due (Unix milliseconds).
pub const H_DUE_AT: &str = "auditstream-due-at";
/// Header: how far down the retry ladder a delivery is (0 = fresh, n =
/// retry rung n − 1), when that is not the topic it sits in (a busy
/// destination's delivery set aside through the first rung).
pub const H_RUNG: &str = "auditstream-rung";
/// Header: times in a row the delivery was set aside because its
/// destination was busy.
pub const H_BOUNCES: &str = "auditstream-bounces";
/// Header: the event's `created_at` (Unix milliseconds), so the deliverer
/// can measure latency without parsing the payload.
pub const H_CREATED_AT: &str = "auditstream-created-at";
/// Header: JSON list of past attempts.
pub const H_HISTORY: &str = "auditstream-history";
/// Header: why a record was dead-lettered.
pub const H_REASON: &str = "auditstream-reason";
/// Header on a record replayed from a dead-letter topic: where in it the
/// record came from (`partition:offset`).
pub const H_REPLAYED_FROM: &str = "auditstream-replayed-from";
/// Header on a destination record (or tombstone): the audit event of the
/// change that wrote it, complete and with its id, which the producer's
/// relay publishes to `audit.events` (SPEC §5). The change and its audit
/// event are one write.
pub const H_AUDIT_EVENT: &str = "auditstream-audit-event";

/// Most attempts kept in a record's history (the oldest are dropped first,
/// the count in [`DeliveryMeta::attempt`] stays exact).
pub const MAX_HISTORY: usize = 32;

/// One past delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// When it ended, Unix milliseconds.
    pub at_ms: i64,
    /// HTTP status, when a response came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong, when no 2xx came back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The metadata of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryMeta {
    /// The destination.
    pub destination_id: String,
    /// The event id.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Attempts made before this record.
    pub attempt: u32,
    /// When the next attempt is due (Unix ms); `None` = now.
    pub due_at_ms: Option<i64>,
    /// The event's `created_at` (Unix ms), when the router could read it.
    pub created_at_ms: Option<i64>,
    /// Ladder position when it differs from the topic's ([`H_RUNG`]).
    pub rung: Option<usize>,
    /// Times in a row set aside as busy ([`H_BOUNCES`]).
    pub bounces: u32,
    /// Past attempts, oldest first.
    pub history: Vec<Attempt>,
}

impl DeliveryMeta {
    /// A first delivery, as the router writes it.
    pub fn new(destination_id: &str, event_id: &str, event_type: &str) -> Self {
        Self {
            destination_id: destination_id.to_owned(),
            event_id: event_id.to_owned(),
            event_type: event_type.to_owned(),
            attempt: 0,
            due_at_ms: None,
            created_at_ms: None,
            rung: None,
            bounces: 0,
            history: Vec::new(),
        }
    }

    /// Records an attempt, keeping at most [`MAX_HISTORY`] entries.
    pub fn record(&mut self, attempt: Attempt) {
        self.attempt = self.attempt.saturating_add(1);
        self.history.push(attempt);
        if self.history.len() > MAX_HISTORY {
            let excess = self.history.len() - MAX_HISTORY;
            self.history.drain(..excess);
        }
    }

    /// The headers of the record. The destination is not among them: it is
    /// the record's key.
    pub fn to_headers(&self) -> Vec<(&'static str, Vec<u8>)> {
        self.fold_headers(Vec::with_capacity(6), |mut h, name, value| {
            h.push((name, value.to_vec()));
            h
        })
    }

    /// Folds the record's headers ([`DeliveryMeta::to_headers`]) into
    /// `init`, name and value by value, without a copy of each: a writer
    /// that copies them into a header list of its own (a Kafka client's)
    /// builds it straight from here. Only the history, when there is one,
    /// is serialized into a buffer first.
    pub fn fold_headers<T>(&self, init: T, mut f: impl FnMut(T, &'static str, &[u8]) -> T) -> T {
        let mut h = f(init, H_EVENT_ID, self.event_id.as_bytes());
        h = f(h, H_EVENT_TYPE, self.event_type.as_bytes());
        let mut digits = itoa::Buffer::new();
        if let Some(created) = self.created_at_ms {
            h = f(h, H_CREATED_AT, digits.format(created).as_bytes());
        }
        if self.attempt > 0 {
            h = f(h, H_ATTEMPT, digits.format(self.attempt).as_bytes());
        }
        if let Some(due) = self.due_at_ms {
            h = f(h, H_DUE_AT, digits.format(due).as_bytes());
        }
        if let Some(rung) = self.rung {
            h = f(h, H_RUNG, digits.format(rung).as_bytes());
        }
        if self.bounces > 0 {
            h = f(h, H_BOUNCES, digits.format(self.bounces).as_bytes());
        }
        if !self.history.is_empty() {
            // Serializing plain data cannot fail.
            h = f(h, H_HISTORY, &serde_json::to_vec(&self.history).unwrap_or_default());
        }
        h
    }

    /// Reads a delivery record: its key (the destination id), its headers
    /// and, when no header names the event (a fresh delivery), the event
    /// id, type and `created_at` from `event`, the record's value. A record
    /// whose headers name the event but not its `created_at` (written
    /// before that header was) takes it from the value when it can.
    pub fn read<'a>(
        key: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
        event: &[u8],
    ) -> Result<Self, String> {
        let (mut dest, mut id, mut ty, mut attempt, mut due, mut history) = (None, None, None, 0u32, None, Vec::new());
        let (mut created, mut rung, mut bounces) = (None, None, 0u32);
        // Borrowed: only the three strings kept are copied.
        let text = |name: &str, v: Option<&'a [u8]>| {
            v.and_then(|v| std::str::from_utf8(v).ok())
                .ok_or_else(|| format!("header {name} is missing its UTF-8 value"))
        };
        for (name, value) in headers {
            match name {
                H_DESTINATION => dest = Some(text(name, value)?.to_owned()),
                H_EVENT_ID => id = Some(text(name, value)?.to_owned()),
                H_EVENT_TYPE => ty = Some(text(name, value)?.to_owned()),
                H_ATTEMPT => {
                    attempt = text(name, value)?.parse().map_err(|_| format!("header {name} is not a count"))?
                }
                H_DUE_AT => {
                    due = Some(
                        text(name, value)?.parse().map_err(|_| format!("header {name} is not a Unix time in ms"))?,
                    )
                }
                H_CREATED_AT => {
                    created = Some(
                        text(name, value)?.parse().map_err(|_| format!("header {name} is not a Unix time in ms"))?,
                    )
                }
                H_RUNG => {
                    rung = Some(text(name, value)?.parse().map_err(|_| format!("header {name} is not a rung number"))?)
                }
                H_BOUNCES => {
                    bounces = text(name, value)?.parse().map_err(|_| format!("header {name} is not a count"))?
                }
                H_HISTORY => {
                    history = serde_json::from_slice(value.unwrap_or_default())
                        .map_err(|e| format!("header {name} is not an attempt list: {e}"))?
                }
                _ => {}
            }
        }
        let created_at =
            |view: &crate::event::EventView| view.created_at.as_deref().and_then(crate::event::timestamp_ms);
        if let (None, None) = (&id, &ty) {
            let view = crate::event::EventView::parse(event).map_err(|errors| {
                let why = crate::event::FieldError::join(&errors);
                format!("no header names the event, and the record's value is not a readable event: {why}")
            })?;
            created = created.or_else(|| created_at(&view));
            id = Some(view.id.as_ref().map_or_else(String::new, ToString::to_string));
            ty = Some(view.event_type.into_owned());
        } else if created.is_none() {
            created = crate::event::EventView::parse(event).ok().as_ref().and_then(created_at);
        }
        let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("header {name} is missing"));
        let destination_id = match dest {
            Some(d) => d,
            None => match key.filter(|k| !k.is_empty()).map(std::str::from_utf8) {
                Some(Ok(k)) => k.to_owned(),
                Some(Err(_)) => return Err("record key (the destination id) is not UTF-8".to_owned()),
                None => {
                    return Err(format!(
                        "record key (the destination id) is missing, and so is header {H_DESTINATION}"
                    ));
                }
            },
        };
        Ok(Self {
            destination_id,
            event_id: need(id, H_EVENT_ID)?,
            event_type: need(ty, H_EVENT_TYPE)?,
            attempt,
            due_at_ms: due,
            created_at_ms: created,
            rung,
            bounces,
            history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(m: &DeliveryMeta) -> DeliveryMeta {
        let h = m.to_headers();
        DeliveryMeta::read(Some(m.destination_id.as_bytes()), h.iter().map(|(k, v)| (*k, Some(v.as_slice()))), b"")
            .unwrap()
    }

    #[test]
    fn an_unattempted_delivery_writes_three_headers_and_its_destination_in_the_key() {
        let mut m = DeliveryMeta::new("dest-1", "e-1", "merge_request_create");
        m.created_at_ms = Some(1_795_255_200_123);
        let names: Vec<&str> = m.to_headers().iter().map(|(k, _)| *k).collect();
        assert_eq!(names, [H_EVENT_ID, H_EVENT_TYPE, H_CREATED_AT]);
        assert_eq!(round_trip(&m), m);
        // Once attempted, the count is written.
        m.record(Attempt { at_ms: 1, status: Some(500), error: None });
        assert!(m.to_headers().iter().any(|(k, v)| *k == H_ATTEMPT && v == b"1"));
    }

    #[test]
    fn records_written_with_a_destination_header_are_still_read() {
        let headers = [
            (H_DESTINATION, Some(&b"old-dest"[..])),
            (H_EVENT_ID, Some(&b"e"[..])),
            (H_EVENT_TYPE, Some(&b"t"[..])),
            (H_ATTEMPT, Some(&b"0"[..])),
        ];
        // The header wins over the key, as the writer of such a record meant.
        let m = DeliveryMeta::read(Some(b"other"), headers, b"").unwrap();
        assert_eq!(m.destination_id, "old-dest");
        assert_eq!(m.attempt, 0);
        let m = DeliveryMeta::read(None, headers, b"").unwrap();
        assert_eq!(m.destination_id, "old-dest");
    }

    const EVENT: &[u8] = br#"{"id":"0190c1d2-7e4f-7a3b-9c2d-1e2f3a4b5c6d","event_type":"merge_request_create","entity_type":"Project","entity_id":7,"created_at":"2026-11-21T10:00:00.123Z","details":{"id":"not-this-one"}}"#;

    #[test]
    fn a_fresh_delivery_without_headers_is_read_from_its_event() {
        let m = DeliveryMeta::read(Some(b"dest-1"), [], EVENT).unwrap();
        let mut want = DeliveryMeta::new("dest-1", "0190c1d2-7e4f-7a3b-9c2d-1e2f3a4b5c6d", "merge_request_create");
        want.created_at_ms = Some(1_795_255_200_123);
        assert_eq!(m, want);
        // Integer ids (GitLab's own) read as their decimal text; no
        // `created_at`, none read.
        let m =
            DeliveryMeta::read(Some(b"d"), [], br#"{"id":42,"event_type":"t","entity_type":"Project","entity_id":1}"#)
                .unwrap();
        assert_eq!((m.event_id.as_str(), m.created_at_ms), ("42", None));
    }

    #[test]
    fn headers_that_name_the_event_win_over_the_value() {
        // As retry rungs and earlier releases write them: the headers are
        // read, the value is not needed.
        let headers =
            [(H_EVENT_ID, Some(&b"h-id"[..])), (H_EVENT_TYPE, Some(&b"h-type"[..])), (H_ATTEMPT, Some(&b"2"[..]))];
        let m = DeliveryMeta::read(Some(b"d"), headers, b"not even json").unwrap();
        assert_eq!((m.event_id.as_str(), m.event_type.as_str(), m.attempt), ("h-id", "h-type", 2));
        // Headers that say nothing of the event leave it to the value.
        let m = DeliveryMeta::read(Some(b"d"), [(H_ATTEMPT, Some(&b"1"[..]))], EVENT).unwrap();
        assert_eq!((m.event_type.as_str(), m.attempt), ("merge_request_create", 1));
        // Half of the pair is still an error, as before.
        let err = DeliveryMeta::read(Some(b"d"), [(H_EVENT_ID, Some(&b"1"[..]))], EVENT).unwrap_err();
        assert!(err.contains(H_EVENT_TYPE), "{err}");
    }

    #[test]
    fn a_record_without_the_created_at_header_takes_it_from_its_event() {
        // Written before the header was: the event names its own.
        let headers = [(H_EVENT_ID, Some(&b"h-id"[..])), (H_EVENT_TYPE, Some(&b"h-type"[..]))];
        let m = DeliveryMeta::read(Some(b"d"), headers, EVENT).unwrap();
        assert_eq!((m.event_id.as_str(), m.created_at_ms), ("h-id", Some(1_795_255_200_123)));
        // The header wins; a value that is no event leaves it unknown.
        let with = [headers[0], headers[1], (H_CREATED_AT, Some(&b"5"[..]))];
        assert_eq!(DeliveryMeta::read(Some(b"d"), with, EVENT).unwrap().created_at_ms, Some(5));
        assert_eq!(DeliveryMeta::read(Some(b"d"), headers, b"not json").unwrap().created_at_ms, None);
    }

    #[test]
    fn a_fresh_delivery_whose_value_is_not_an_event_is_named_unreadable() {
        for (value, why) in [
            (&b"not json"[..], "must be a JSON object"),
            (&br#"{"id":"#[..], "JSON"),
            (&b""[..], "is empty"),
            (&br#"[1,2]"#[..], "must be a JSON object"),
            (&br#"{"id":"x","entity_type":"Project","entity_id":1}"#[..], "event_type"),
        ] {
            let err = DeliveryMeta::read(Some(b"d"), [], value).unwrap_err();
            assert!(
                err.starts_with("no header names the event, and the record's value is not a readable event"),
                "{err}"
            );
            assert!(err.contains(why), "{why}: {err}");
        }
        // The key is still required.
        let err = DeliveryMeta::read(None, [], EVENT).unwrap_err();
        assert!(err.contains("record key (the destination id) is missing"), "{err}");
    }

    #[test]
    fn numbers_are_written_as_decimal_text() {
        for n in [0, 7, 10, -1, 1_795_255_200_123, i64::MIN, i64::MAX] {
            let mut m = DeliveryMeta::new("d", "e", "t");
            m.due_at_ms = Some(n);
            let headers = m.to_headers();
            let due = headers.iter().find(|(k, _)| *k == H_DUE_AT).map(|(_, v)| v.as_slice());
            assert_eq!(due, Some(n.to_string().as_bytes()), "{n}");
        }
    }

    #[test]
    fn missing_and_bad_headers_are_named() {
        let complete = [(H_EVENT_ID, Some(&b"1"[..])), (H_EVENT_TYPE, Some(&b"t"[..]))];
        let err = DeliveryMeta::read(None, complete, b"").unwrap_err();
        assert!(err.contains("record key (the destination id) is missing") && err.contains(H_DESTINATION), "{err}");
        let err = DeliveryMeta::read(Some(b""), complete, b"").unwrap_err();
        assert!(err.contains("record key (the destination id) is missing"), "{err}");
        let err = DeliveryMeta::read(Some(b"\xff"), complete, b"").unwrap_err();
        assert!(err.contains("record key (the destination id) is not UTF-8"), "{err}");
        let key = Some(&b"d"[..]);
        let err = DeliveryMeta::read(key, [(H_EVENT_ID, Some(&b"1"[..]))], b"").unwrap_err();
        assert!(err.contains(H_EVENT_TYPE), "{err}");
        let err = DeliveryMeta::read(key, [(H_ATTEMPT, Some(&b"x"[..]))], b"").unwrap_err();
        assert!(err.contains(H_ATTEMPT), "{err}");
        let err = DeliveryMeta::read(key, [(H_EVENT_TYPE, None)], b"").unwrap_err();
        assert!(err.contains(H_EVENT_TYPE), "{err}");
        let err = DeliveryMeta::read(key, [(H_CREATED_AT, Some(&b"2026-11-21"[..]))], b"").unwrap_err();
        assert!(err.contains(H_CREATED_AT), "{err}");
        let err = DeliveryMeta::read(key, [(H_RUNG, Some(&b"-1"[..]))], b"").unwrap_err();
        assert!(err.contains(H_RUNG), "{err}");
        let err = DeliveryMeta::read(key, [(H_DUE_AT, Some(&b"soon"[..]))], b"").unwrap_err();
        assert_eq!(err, format!("header {H_DUE_AT} is not a Unix time in ms"));
        let err = DeliveryMeta::read(key, [(H_BOUNCES, Some(&b"1.5"[..]))], b"").unwrap_err();
        assert_eq!(err, format!("header {H_BOUNCES} is not a count"));
        let err = DeliveryMeta::read(key, [(H_HISTORY, Some(&b"[{\"status\""[..]))], b"").unwrap_err();
        assert!(err.starts_with(&format!("header {H_HISTORY} is not an attempt list: ")), "{err}");
    }

    #[test]
    fn history_is_capped_but_count_exact() {
        let mut m = DeliveryMeta::new("d", "e", "t");
        for i in 0..40 {
            m.record(Attempt { at_ms: i, status: Some(500), error: None });
        }
        assert_eq!(m.attempt, 40);
        assert_eq!(m.history.len(), MAX_HISTORY);
        assert_eq!(m.history[0].at_ms, 8);
        assert_eq!(round_trip(&m), m);
    }

    proptest! {
        #[test]
        fn headers_round_trip(
            dest in "[a-z0-9-]{1,36}", id in "[!-~]{1,64}", ty in "[a-z_]{1,40}",
            tries in proptest::collection::vec((any::<i64>(), proptest::option::of(100u16..600), proptest::option::of(".{0,40}")), 0..5),
            due in proptest::option::of(any::<i64>()),
            created in proptest::option::of(any::<i64>()),
            rung in proptest::option::of(0usize..100),
            bounces in 0u32..50,
        ) {
            let mut m = DeliveryMeta::new(&dest, &id, &ty);
            for (at_ms, status, error) in tries {
                m.record(Attempt { at_ms, status, error });
            }
            m.due_at_ms = due;
            m.created_at_ms = created;
            m.rung = rung;
            m.bounces = bounces;
            prop_assert_eq!(round_trip(&m), m);
        }
    }
}
