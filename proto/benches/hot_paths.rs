//! The producer's and deliverer's per-event hot paths: parsing and
//! validating an event (`proto::event::prepare`, on the golden GitLab
//! example, complete and with `id`/`created_at` left for the producer to
//! fill) and signing a delivery (`proto::signature::signature`, one secret
//! and two during rotation).
//!
//! Run: `cargo bench -p proto --bench hot_paths`

#![allow(missing_docs)] // criterion's generated entry points

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::{EventLimits, Registry, destination::SigningSecret};

const GOLDEN: &[u8] = include_bytes!("../tests/golden/merge_request_create.json");

/// The golden event without `id` and `created_at`, so `prepare` mints both.
fn incomplete() -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(GOLDEN).expect("golden example is JSON");
    let object = value.as_object_mut().expect("an object");
    object.remove("id");
    object.remove("created_at");
    serde_json::to_vec(&value).expect("serializes")
}

fn prepare(c: &mut Criterion) {
    let registry = Registry::embedded();
    let limits = EventLimits::default();
    let now = time::OffsetDateTime::now_utc();
    let incomplete = incomplete();
    let mut group = c.benchmark_group("prepare");
    group.throughput(Throughput::Elements(1));
    group.bench_function("complete", |b| {
        b.iter(|| proto::event::prepare(black_box(GOLDEN), &registry, &limits, now).expect("valid"))
    });
    group.bench_function("fills_id_and_created_at", |b| {
        b.iter(|| proto::event::prepare(black_box(&incomplete), &registry, &limits, now).expect("valid"))
    });
    group.finish();
}

fn sign(c: &mut Criterion) {
    let current = SigningSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
    let previous = SigningSecret::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("secret");
    let mut group = c.benchmark_group("signature");
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_secret", |b| {
        b.iter(|| proto::signature::signature(&[&current], "msg_1", 1_700_000_000, black_box(GOLDEN)))
    });
    group.bench_function("two_secrets", |b| {
        b.iter(|| proto::signature::signature(&[&current, &previous], "msg_1", 1_700_000_000, black_box(GOLDEN)))
    });
    group.finish();
}

criterion_group!(benches, prepare, sign);
criterion_main!(benches);
