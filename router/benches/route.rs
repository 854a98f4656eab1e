//! Routing at scale: 100k namespaces (depth up to 6) and 10k destinations
//! with filters. Reports decisions per second on one core, the tables'
//! memory, and allocations per decision.
//!
//! Run: `cargo bench -p router --bench route`

#![allow(unsafe_code, missing_docs)] // the counting allocator below

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::tree::Tree;
use proto::{
    EventView, Registry,
    destination::{
        Category, Destination, DestinationName, DestinationUrl, Directory, EventTypeFilter, Owner, VerificationToken,
    },
    namespace::{NamespaceRecord, NamespaceRef},
};
use router::route::route;

/// Counts live bytes and allocation calls.
struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size(), Relaxed);
        CALLS.fetch_add(1, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        BYTES.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TOP_GROUPS: i64 = 1_000;
const SUBGROUP_DEPTH: i64 = 4; // top group + 4 nested subgroups + project = depth 6
const PROJECTS: i64 = 95_000;
const DESTINATIONS: i64 = 10_000;

fn build_tree() -> Tree {
    let mut t = Tree::default();
    for g in 0..TOP_GROUPS {
        t.upsert(NamespaceRef::group(g), NamespaceRecord { parent: None, full_path: format!("g{g}") });
        let mut parent = g;
        for d in 1..=SUBGROUP_DEPTH {
            let id = d * TOP_GROUPS + g;
            t.upsert(
                NamespaceRef::group(id),
                NamespaceRecord { parent: Some(NamespaceRef::group(parent)), full_path: format!("g{g}/s{d}") },
            );
            parent = id;
        }
    }
    for p in 0..PROJECTS {
        let g = p % TOP_GROUPS;
        let depth = p % (SUBGROUP_DEPTH + 1);
        let parent = depth * TOP_GROUPS + g;
        t.upsert(
            NamespaceRef::project(p),
            NamespaceRecord { parent: Some(NamespaceRef::group(parent)), full_path: format!("g{g}/p{p}") },
        );
    }
    t
}

fn build_destinations() -> Directory {
    let types = ["audit_operation", "merge_request_create", "repository_git_operation", "project_fork_operation"];
    let mut d = Directory::default();
    for i in 0..DESTINATIONS {
        let owner = if i < 10 { Owner::Instance } else { Owner::Group { id: i % TOP_GROUPS } };
        let event_type_filters = match i % 4 {
            0 => EventTypeFilter::default(),
            1 => EventTypeFilter::Allow(vec![types[(i % 3) as usize].into(), "category:compliance_management".into()]),
            2 => EventTypeFilter::Deny(vec![types[(i % 4) as usize].into()]),
            _ => EventTypeFilter::Allow(types.iter().map(|t| t.to_string()).collect()),
        };
        let namespace_filters = match (owner, i % 3) {
            (Owner::Group { id }, 0) => vec![NamespaceRef::group(2 * TOP_GROUPS + id), NamespaceRef::project(id)],
            _ => vec![],
        };
        d.upsert(Destination {
            id: format!("dest-{i}"),
            owner,
            name: DestinationName::new(format!("d{i}")).expect("name"),
            category: Category::Http,
            url: DestinationUrl::new(format!("https://siem{i}.example.com/in")).expect("url"),
            verification_token: VerificationToken::new("0123456789abcdef0123").expect("token"),
            signing_secret: None,
            previous_signing_secret: None,
            headers: vec![],
            event_type_filters,
            namespace_filters,
            active: i % 10 != 9,
        });
    }
    d
}

fn events() -> Vec<Vec<u8>> {
    let types = ["audit_operation", "merge_request_create", "repository_git_operation", "project_fork_operation"];
    (0..10_000i64)
        .map(|i| {
            let p = (i * 7919) % PROJECTS;
            format!(
                r#"{{"id":"{i}","author_id":1,"author_name":"a","entity_id":{p},"entity_type":"Project","entity_path":"g{}/p{p}","target_id":1,"target_type":"MergeRequest","target_details":"t","event_type":"{}","ip_address":"127.0.0.1","created_at":"2022-03-09T06:53:11.181Z","details":{{"custom_message":"m"}}}}"#,
                p % TOP_GROUPS,
                types[(i % 4) as usize]
            )
            .into_bytes()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let before = BYTES.load(Relaxed);
    let tree = build_tree();
    let after_tree = BYTES.load(Relaxed);
    let dirs = build_destinations();
    let after_dirs = BYTES.load(Relaxed);
    let registry = Registry::embedded();
    let events = events();
    let views: Vec<EventView<'_>> = events.iter().map(|e| EventView::parse(e).expect("valid")).collect();

    // Allocations per decision, outside the timed loop.
    let mut out: Vec<Arc<Destination>> = Vec::with_capacity(64);
    let mut matched = 0usize;
    let calls = CALLS.load(Relaxed);
    for v in &views {
        out.clear();
        route(v, &tree, &dirs, &registry, false, &mut out).expect("routes");
        matched += out.len();
    }
    let per_decision = (CALLS.load(Relaxed) - calls) as f64 / views.len() as f64;
    println!(
        "tables: {} namespaces use {:.1} MiB, {} destinations use {:.1} MiB",
        tree.len(),
        (after_tree - before) as f64 / 1048576.0,
        dirs.len(),
        (after_dirs - after_tree) as f64 / 1048576.0
    );
    println!(
        "decisions: {:.1} destinations matched per event; {per_decision:.3} allocations per decision (output buffer reused)",
        matched as f64 / views.len() as f64
    );

    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("route_decision", |b| {
        b.iter(|| {
            out.clear();
            let v = &views[i % views.len()];
            i += 1;
            black_box(route(black_box(v), &tree, &dirs, &registry, false, &mut out).ok());
        })
    });
    let mut j = 0;
    g.bench_function("parse_and_route", |b| {
        b.iter(|| {
            out.clear();
            let e = &events[j % events.len()];
            j += 1;
            let v = EventView::parse(black_box(e)).expect("valid");
            black_box(route(&v, &tree, &dirs, &registry, false, &mut out).ok());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
