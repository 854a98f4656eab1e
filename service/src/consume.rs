//! The at-least-once consumer loop shared by router and deliverer.
//!
//! Each message is handed to a task that must *finish* it: do its work, or
//! move it somewhere durable (a retry or dead-letter topic). Only then does
//! its offset count as done, and the stored offset only ever advances to
//! just below the lowest unfinished one ([`Watermarks`]). In-flight work is
//! bounded: at the bound the loop stops reading. At shutdown it stops
//! reading, waits for the tasks in flight up to the grace deadline, stores
//! what finished and commits.

use std::{future::Future, time::Duration};

use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::OwnedMessage,
};
use tokio::sync::mpsc;

use crate::{offsets::Watermarks, shutdown::Shutdown};

/// Limits of one consumer loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopLimits {
    /// Most messages in flight at once.
    pub max_in_flight: usize,
    /// How long to wait for in-flight work at shutdown.
    pub grace: Duration,
}

/// Runs until `shutdown`, spawning `handler(message)` for each message.
pub async fn run<H, F>(consumer: StreamConsumer, limits: LoopLimits, mut shutdown: Shutdown, handler: H)
where
    H: Fn(OwnedMessage) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, i32, i64)>();
    let mut marks = Watermarks::default();
    let finish = |marks: &mut Watermarks, (topic, partition, offset): (String, i32, i64)| {
        if let Some(next) = marks.finish(&topic, partition, offset)
            && let Err(e) = consumer.store_offset(&topic, partition, next)
        {
            // The partition was revoked meanwhile: its new owner re-reads
            // from the last commit, so nothing is lost (a duplicate at most).
            tracing::debug!(%topic, partition, error = %e, "offset not stored");
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            Some(done) = done_rx.recv() => finish(&mut marks, done),
            received = consumer.recv(), if marks.in_flight() < limits.max_in_flight => match received {
                Ok(m) => {
                    let m = m.detach();
                    let key = (m.topic().to_owned(), m.partition(), m.offset());
                    marks.start(&key.0, key.1, key.2);
                    let work = handler(m);
                    let tx = done_tx.clone();
                    tokio::spawn(async move {
                        work.await;
                        let _ = tx.send(key);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let deadline = tokio::time::Instant::now() + limits.grace;
    while marks.in_flight() > 0 {
        tokio::select! {
            Some(done) = done_rx.recv() => finish(&mut marks, done),
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(in_flight = marks.in_flight(), "grace deadline reached; unfinished messages will be read again");
                break;
            }
        }
    }
    while let Ok(done) = done_rx.try_recv() {
        finish(&mut marks, done);
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
}
