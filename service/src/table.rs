//! A compacted topic materialized in memory (a "table"): read to the end
//! before the owner reports ready, then followed, so changes reach the
//! service within moments and without a restart.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, RwLockReadGuard},
    time::Duration,
};

use rdkafka::{Message, Offset, TopicPartitionList, consumer::Consumer, error::KafkaError};

use crate::{admin::ReadyFlag, config::KafkaConfig, kafka, shutdown::Shutdown};

/// The state a table builds from its records.
pub trait TableState: Send + Sync + 'static {
    /// Applies one record; `value` is `None` for a tombstone. A record that
    /// cannot be read returns the reason; it is logged and skipped, and the
    /// previous state for that key is kept.
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String>;
}

/// A shared, read-mostly view of a table's state.
#[derive(Debug)]
pub struct Table<S> {
    state: Arc<RwLock<S>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<S> Clone for Table<S> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone(), ready: self.ready.clone() }
    }
}

impl<S> Table<S> {
    /// A table over `state`, ready at once (no reader attached; for tests
    /// and tools).
    pub fn new(state: S) -> Self {
        let (tx, ready) = tokio::sync::watch::channel(true);
        std::mem::forget(tx);
        Self { state: Arc::new(RwLock::new(state)), ready }
    }

    /// Waits until the table was read to the end once.
    pub async fn wait_ready(&self) {
        let _ = self.ready.clone().wait_for(|r| *r).await;
    }

    /// Changes the state directly: a writer applies its own acknowledged
    /// write at once (the follower applies the same record again later,
    /// which must be idempotent).
    pub fn update(&self, f: impl FnOnce(&mut S)) {
        f(&mut self.state.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Reads the current state. Hold the guard briefly: the follower waits.
    pub fn read(&self) -> RwLockReadGuard<'_, S> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), String>
    where
        S: TableState,
    {
        self.state.write().unwrap_or_else(|e| e.into_inner()).apply(key, value)
    }
}

/// Starts following `topic` into `state`. `ready` is set once every
/// partition was read to the end offset seen at start.
pub async fn follow<S: TableState>(
    config: &KafkaConfig,
    topic: &str,
    state: S,
    ready: ReadyFlag,
    mut shutdown: Shutdown,
) -> Result<(Table<S>, tokio::task::JoinHandle<()>), KafkaError> {
    let consumer = kafka::reader(config, kafka::Path::Background)?;
    let count = kafka::partitions(&consumer, topic, Duration::from_secs(30)).await?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..count {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
    }
    consumer.assign(&tpl)?;
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let table = Table { state: Arc::new(RwLock::new(state)), ready: ready_rx };
    let follower = table.clone();
    let mark_ready = move |r: bool| {
        ready.set(r);
        ready_tx.send_replace(r);
    };
    let topic = topic.to_owned();
    let task = tokio::spawn(async move {
        let mut caught_up = false;
        mark_ready(false);
        loop {
            let msg = tokio::select! {
                _ = shutdown.wait() => return,
                m = tokio::time::timeout(Duration::from_millis(250), consumer.recv()) => m,
            };
            match msg {
                Ok(Ok(m)) => {
                    let key = m.key().unwrap_or_default();
                    if let Err(reason) = follower.apply(key, m.payload()) {
                        tracing::warn!(topic = %topic, offset = m.offset(), %reason, "skipped unreadable table record");
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %topic, error = %e, "table read error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Only judge "read to the end" when idle: every partition at
                // or past the end offset seen at start *and* nothing more
                // arriving. Some brokers under-report end offsets (Tansu,
                // see docs/ARCHITECTURE.md), so the offsets alone are not
                // trusted.
                Err(_idle) if !caught_up => {
                    caught_up = consumer.position().is_ok_and(|pos| {
                        pos.elements().iter().all(|e| match e.offset() {
                            Offset::Offset(o) => o >= ends.get(&e.partition()).copied().unwrap_or(0),
                            _ => ends.get(&e.partition()).copied().unwrap_or(0) == 0,
                        })
                    });
                    if caught_up {
                        tracing::info!(topic = %topic, "table read to the end");
                        mark_ready(true);
                    }
                }
                Err(_idle) => {}
            }
        }
    });
    Ok((table, task))
}

impl TableState for proto::destination::Directory {
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let id = std::str::from_utf8(key).map_err(|_| "destination key is not UTF-8".to_owned())?;
        match value {
            None => {
                self.remove(id);
                Ok(())
            }
            Some(bytes) => {
                let d = self.decode(bytes).map_err(|e| format!("destination {id}: {e}"))?;
                if d.id != id {
                    return Err(format!("destination record id {:?} differs from its key {id:?}", d.id));
                }
                self.upsert(d);
                Ok(())
            }
        }
    }
}

impl TableState for proto::tree::Tree {
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        proto::tree::Tree::apply(self, key, value)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proto::{
        destination::{Destination, Directory, Owner},
        seal::Keyring,
    };

    use super::TableState;

    fn siem() -> Destination {
        Destination::http("d-1", Owner::Instance, "SIEM", "https://siem.example.com/in", "0123456789abcdef").unwrap()
    }

    fn record(d: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(d).unwrap()
    }

    /// Whatever a record that cannot be read says, the destination keeps
    /// the version read before it.
    #[test]
    fn destination_records_that_cannot_be_read_are_refused_and_the_last_good_one_kept() {
        let keyring = Keyring::new([("k1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")]).unwrap();
        let mut table = Directory::with_keyring(Some(Arc::new(keyring)));
        let good = serde_json::to_value(siem()).unwrap();
        table.apply(b"d-1", Some(&record(&good))).unwrap();
        let renamed = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            v["name"] = "Renamed".into();
            f(&mut v);
            record(&v)
        };

        assert_eq!(table.apply(b"d-\xff", Some(&renamed(&|_| ()))), Err("destination key is not UTF-8".into()));
        assert_eq!(
            table.apply(b"d-2", Some(&renamed(&|_| ()))),
            Err(r#"destination record id "d-1" differs from its key "d-2""#.into())
        );
        assert!(table.get("d-2").is_none());
        let cases: [(&str, Vec<u8>); 5] = [
            ("not JSON", renamed(&|_| ())[..20].to_vec()),
            ("unknown field `colour`", renamed(&|v| v["colour"] = "red".into())),
            ("verification_token", renamed(&|v| v["verification_token"] = "short".into())),
            (
                "/verification_token: malformed sealed value",
                renamed(&|v| v["verification_token"] = "sealed:v1:k1".into()),
            ),
            (
                r#"/verification_token: sealed with key "k9", which is not configured"#,
                renamed(&|v| v["verification_token"] = "sealed:v1:k9:AAAA".into()),
            ),
        ];
        for (what, bytes) in cases {
            let err = table.apply(b"d-1", Some(&bytes)).unwrap_err();
            assert!(err.starts_with("destination d-1: "), "{what}: {err}");
            assert!(what == "not JSON" || err.contains(what), "{what}: {err}");
            assert_eq!(table.get("d-1").unwrap().name.expose(), "SIEM", "{what}: the last good version kept");
        }
        table.apply(b"d-1", Some(&renamed(&|_| ()))).unwrap();
        assert_eq!(table.get("d-1").unwrap().name.expose(), "Renamed");
        table.apply(b"d-1", None).unwrap();
        assert!(table.get("d-1").is_none(), "a tombstone removes it");
    }
}
