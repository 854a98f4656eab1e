//! The routing decision (SPEC §4): which destinations get an event.

use std::sync::Arc;

use proto::{
    EventView, Registry,
    destination::{Destination, Directory},
    namespace::{NamespaceKind, NamespaceRef},
};

use proto::tree::{BadTree, Chain, Root, Tree};

/// How the root was found; for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// From the tree.
    Tree,
    /// From the first segment of `entity_path`.
    Path,
    /// `User` and `Instance` events: instance destinations only.
    InstanceScope,
    /// Neither tree nor path named a known group: instance only.
    Unknown,
    /// The tree is bad data (cycle, too deep): instance only.
    Bad(BadTree),
}

/// What the router does with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Deliver to the destinations pushed into the output.
    Route(Resolution),
    /// The type is registered but not streamed: deliver nowhere.
    NotStreamed,
}

/// Decides where an event goes. Matching destinations are appended to
/// `out`; nothing else is allocated. `Err` names why the event is poison.
pub fn route(
    event: &EventView<'_>,
    tree: &Tree,
    destinations: &Directory,
    registry: &Registry,
    accept_unknown: bool,
    out: &mut Vec<Arc<Destination>>,
) -> Result<Decision, String> {
    let category = match registry.get(&event.event_type) {
        Some(def) if !def.streamed => return Ok(Decision::NotStreamed),
        Some(def) => Some(def.feature_category.as_str()),
        None if accept_unknown => None,
        None => {
            return Err(format!("event type {:?} is not registered", event.event_type));
        }
    };
    if event.id.is_none() {
        return Err("the event has no id".into());
    }

    let entity = match event.entity_type.as_ref() {
        "Project" => Some(NamespaceRef::project(event.entity_id)),
        "Group" => Some(NamespaceRef::group(event.entity_id)),
        _ => None,
    };
    let path = event.entity_path.as_deref();
    let (root, chain, resolution) = match event.entity_type.as_ref() {
        "User" | "Instance" => (Root::InstanceOnly, None, Resolution::InstanceScope),
        _ => match entity.map(|e| tree.resolve(e)) {
            Some(Ok(Some((root, chain)))) => (root, Some(chain), Resolution::Tree),
            Some(Err(bad)) => (Root::InstanceOnly, None, Resolution::Bad(bad)),
            Some(Ok(None)) | None => {
                match path.and_then(|p| p.split('/').next()).and_then(|top| tree.top_level_by_path(top)) {
                    Some(group) => (Root::Group(group), None, Resolution::Path),
                    None => (Root::InstanceOnly, None, Resolution::Unknown),
                }
            }
        },
    };

    let group_destinations = match root {
        Root::Group(g) => destinations.group(g),
        Root::InstanceOnly => &[],
    };
    for d in destinations.instance().iter().chain(group_destinations) {
        if d.active
            && d.event_type_filters.admits(&event.event_type, category)
            && namespaces_match(d, entity, chain.as_ref(), path, tree)
        {
            out.push(d.clone());
        }
    }
    Ok(Decision::Route(resolution))
}

fn namespaces_match(
    d: &Destination,
    entity: Option<NamespaceRef>,
    chain: Option<&Chain>,
    path: Option<&str>,
    tree: &Tree,
) -> bool {
    d.namespace_filters.is_empty()
        || d.namespace_filters.iter().any(|f| match f.kind {
            NamespaceKind::Project => entity == Some(*f),
            NamespaceKind::Group => match chain {
                Some(chain) => chain.contains(*f),
                // Without a chain, compare paths: the filter group's path is
                // the event's path or a prefix of it, segment-wise.
                None => match (tree.get(*f), path) {
                    (Some(g), Some(p)) => {
                        p == g.full_path
                            || (p.starts_with(&g.full_path) && p.as_bytes().get(g.full_path.len()) == Some(&b'/'))
                    }
                    _ => false,
                },
            },
            NamespaceKind::User => false,
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proto::{
        destination::{Category, DestinationName, DestinationUrl, Owner, VerificationToken},
        namespace::NamespaceRecord,
    };

    use super::*;
    use proto::tree::BadTree;

    fn dest(id: &str, owner: Owner) -> Destination {
        Destination {
            id: id.into(),
            owner,
            name: DestinationName::new(id).unwrap(),
            category: Category::Http,
            url: DestinationUrl::new("https://example.com/").unwrap(),
            verification_token: VerificationToken::new("0123456789abcdef").unwrap(),
            signing_secret: None,
            previous_signing_secret: None,
            headers: vec![],
            event_type_filters: Default::default(),
            namespace_filters: vec![],
            active: true,
        }
    }

    /// acme (1) > platform (2) > api (project 20); acme > web (project 21);
    /// other (3) > tool (project 30); alice (user 5) > dotfiles (project 50);
    /// a cycle 7 <-> 8 with project 80 under 8.
    fn world() -> (Tree, Directory) {
        let mut t = Tree::default();
        let rec = |parent, path: &str| NamespaceRecord { parent, full_path: path.into() };
        t.upsert(NamespaceRef::group(1), rec(None, "acme"));
        t.upsert(NamespaceRef::group(2), rec(Some(NamespaceRef::group(1)), "acme/platform"));
        t.upsert(NamespaceRef::project(20), rec(Some(NamespaceRef::group(2)), "acme/platform/api"));
        t.upsert(NamespaceRef::project(21), rec(Some(NamespaceRef::group(1)), "acme/web"));
        t.upsert(NamespaceRef::group(3), rec(None, "other"));
        t.upsert(NamespaceRef::project(30), rec(Some(NamespaceRef::group(3)), "other/tool"));
        t.upsert(NamespaceRef::user(5), rec(None, "alice"));
        t.upsert(NamespaceRef::project(50), rec(Some(NamespaceRef::user(5)), "alice/dotfiles"));
        t.upsert(NamespaceRef::group(7), rec(Some(NamespaceRef::group(8)), "loop/a"));
        t.upsert(NamespaceRef::group(8), rec(Some(NamespaceRef::group(7)), "loop/b"));
        t.upsert(NamespaceRef::project(80), rec(Some(NamespaceRef::group(8)), "loop/b/p"));

        let mut d = Directory::default();
        d.upsert(dest("inst", Owner::Instance));
        d.upsert(dest("acme", Owner::Group { id: 1 }));
        d.upsert(dest("other", Owner::Group { id: 3 }));
        let mut off = dest("acme-off", Owner::Group { id: 1 });
        off.active = false;
        d.upsert(off);
        let mut allow = dest("acme-mr-only", Owner::Group { id: 1 });
        allow.event_type_filters = EventTypeFilter::Allow(vec!["merge_request_create".into()]);
        d.upsert(allow);
        let mut deny = dest("acme-no-git", Owner::Group { id: 1 });
        deny.event_type_filters = EventTypeFilter::Deny(vec!["repository_git_operation".into()]);
        d.upsert(deny);
        let mut category = dest("inst-compliance", Owner::Instance);
        category.event_type_filters = EventTypeFilter::Allow(vec!["category:compliance_management".into()]);
        d.upsert(category);
        let mut platform = dest("acme-platform", Owner::Group { id: 1 });
        platform.namespace_filters = vec![NamespaceRef::group(2)];
        d.upsert(platform);
        let mut web = dest("acme-web", Owner::Group { id: 1 });
        web.namespace_filters = vec![NamespaceRef::project(21)];
        d.upsert(web);
        (t, d)
    }

    use proto::destination::EventTypeFilter;

    fn run(
        tree: &Tree,
        dirs: &Directory,
        event: &str,
        accept_unknown: bool,
    ) -> Result<(Decision, BTreeSet<String>), String> {
        let view = EventView::parse(event.as_bytes()).map_err(|e| format!("{e:?}"))?;
        let mut out = Vec::new();
        let d = route(&view, tree, dirs, &Registry::embedded(), accept_unknown, &mut out)?;
        Ok((d, out.iter().map(|d| d.id.clone()).collect()))
    }

    fn ev(ty: &str, entity_type: &str, id: i64, path: &str) -> String {
        format!(
            r#"{{"id":"e","event_type":"{ty}","entity_type":"{entity_type}","entity_id":{id},"entity_path":"{path}"}}"#
        )
    }

    /// Every rule of SPEC §4, one row each: (rule, event, destinations).
    #[test]
    fn spec_rules() {
        let (tree, dirs) = world();
        let all_acme = ["inst", "acme", "acme-no-git"];
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "group destination gets its top-level group's own events",
                ev("audit_operation", "Group", 1, "acme"),
                [&all_acme[..], &["inst-compliance"]].concat(),
            ),
            (
                "group destination gets subgroup events; group filter matches the group itself",
                ev("audit_operation", "Group", 2, "acme/platform"),
                [&all_acme[..], &["inst-compliance", "acme-platform"]].concat(),
            ),
            (
                "projects deep in the tree; group filter matches below it",
                ev("project_fork_operation", "Project", 20, "acme/platform/api"),
                [&all_acme[..], &["acme-platform"]].concat(),
            ),
            (
                "project filter matches that project exactly",
                ev("project_fork_operation", "Project", 21, "acme/web"),
                [&all_acme[..], &["acme-web"]].concat(),
            ),
            (
                "another tree's destinations get nothing of acme; acme's nothing of it",
                ev("project_fork_operation", "Project", 30, "other/tool"),
                vec!["inst", "other"],
            ),
            (
                "allow-list admits only its types",
                ev("merge_request_create", "Project", 21, "acme/web"),
                [&all_acme[..], &["acme-mr-only", "acme-web"]].concat(),
            ),
            (
                "deny-list drops its types",
                ev("repository_git_operation", "Project", 21, "acme/web"),
                vec!["inst", "acme", "acme-web"],
            ),
            (
                "personal namespaces reach instance destinations only",
                ev("project_fork_operation", "Project", 50, "alice/dotfiles"),
                vec!["inst"],
            ),
            ("User events reach instance destinations only", ev("user_access_locked", "User", 5, "acme"), vec!["inst"]),
            (
                "Instance events reach instance destinations only, category filters apply",
                ev("audit_operation", "Instance", 1, "acme"),
                vec!["inst", "inst-compliance"],
            ),
            (
                "unknown entity: first segment of entity_path names the root",
                ev("project_fork_operation", "Project", 999, "acme/new-project"),
                all_acme.to_vec(),
            ),
            (
                "unknown entity: group filter matched by path prefix",
                ev("project_fork_operation", "Project", 998, "acme/platform/new"),
                [&all_acme[..], &["acme-platform"]].concat(),
            ),
            (
                "unknown entity: a path prefix that is not a whole segment does not match",
                ev("project_fork_operation", "Project", 997, "acme/platformer/x"),
                all_acme.to_vec(),
            ),
            (
                "unknown type of entity uses the path",
                ev("project_fork_operation", "MergeRequest", 1, "other/tool"),
                vec!["inst", "other"],
            ),
            (
                "unknown root path: instance only",
                ev("project_fork_operation", "Project", 996, "nobody/x"),
                vec!["inst"],
            ),
            ("a cycle is bad data: instance only", ev("project_fork_operation", "Project", 80, "acme/x"), vec!["inst"]),
        ];
        for (rule, event, want) in cases {
            let (decision, got) = run(&tree, &dirs, &event, false).unwrap();
            assert!(matches!(decision, Decision::Route(_)), "{rule}");
            let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
            assert_eq!(got, want, "{rule}");
        }
    }

    #[test]
    fn resolution_is_reported() {
        let (tree, dirs) = world();
        let how = |e: String| match run(&tree, &dirs, &e, false).unwrap().0 {
            Decision::Route(r) => r,
            Decision::NotStreamed => panic!("streamed"),
        };
        assert_eq!(how(ev("audit_operation", "Project", 20, "x")), Resolution::Tree);
        assert_eq!(how(ev("audit_operation", "Project", 999, "acme/x")), Resolution::Path);
        assert_eq!(how(ev("audit_operation", "Project", 999, "zzz/x")), Resolution::Unknown);
        assert_eq!(how(ev("audit_operation", "User", 1, "x")), Resolution::InstanceScope);
        assert_eq!(how(ev("audit_operation", "Project", 80, "x")), Resolution::Bad(BadTree::Cycle));
    }

    #[test]
    fn chains_deeper_than_20_go_to_instance_only() {
        let (mut tree, dirs) = world();
        let rec = |parent, path: &str| NamespaceRecord { parent, full_path: path.into() };
        for i in 0..21 {
            tree.upsert(
                NamespaceRef::group(100 + i),
                rec(Some(NamespaceRef::group(if i == 0 { 1 } else { 99 + i })), "acme/deep"),
            );
        }
        tree.upsert(NamespaceRef::project(200), rec(Some(NamespaceRef::group(120)), "acme/deep/p"));
        let (d, got) = run(&tree, &dirs, &ev("project_fork_operation", "Project", 200, "acme/deep/p"), false).unwrap();
        assert_eq!(d, Decision::Route(Resolution::Bad(BadTree::TooDeep)));
        assert_eq!(got, BTreeSet::from(["inst".to_string()]));
    }

    #[test]
    fn transfers_follow_the_newest_tree() {
        let (mut tree, dirs) = world();
        let e = ev("project_fork_operation", "Project", 21, "acme/web");
        assert!(run(&tree, &dirs, &e, false).unwrap().1.contains("acme"));
        tree.upsert(
            NamespaceRef::project(21),
            NamespaceRecord { parent: Some(NamespaceRef::group(3)), full_path: "other/web".into() },
        );
        let got = run(&tree, &dirs, &e, false).unwrap().1;
        assert_eq!(got, BTreeSet::from(["inst".into(), "other".into()]), "moved project routes to its new root");
        tree.upsert(
            NamespaceRef::group(2),
            NamespaceRecord { parent: Some(NamespaceRef::group(3)), full_path: "other/platform".into() },
        );
        let got =
            run(&tree, &dirs, &ev("project_fork_operation", "Project", 20, "acme/platform/api"), false).unwrap().1;
        assert_eq!(got, BTreeSet::from(["inst".into(), "other".into()]), "moved subgroup takes its projects along");
    }

    #[test]
    fn unstreamed_unknown_and_idless_events() {
        let (tree, dirs) = world();
        let (d, got) = run(&tree, &dirs, &ev("login_failed_with_otp_authentication", "User", 1, "x"), false).unwrap();
        assert_eq!(d, Decision::NotStreamed);
        assert!(got.is_empty());
        let unknown = ev("brand_new_type", "Project", 20, "acme/platform/api");
        assert!(run(&tree, &dirs, &unknown, false).unwrap_err().contains("not registered"));
        let (_, got) = run(&tree, &dirs, &unknown, true).unwrap();
        assert!(got.contains("inst") && got.contains("acme") && !got.contains("inst-compliance"));
        let idless = r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":20}"#;
        assert!(run(&tree, &dirs, idless, false).unwrap_err().contains("no id"));
    }

    #[test]
    fn inactive_destinations_get_nothing_and_keep_config() {
        let (tree, dirs) = world();
        let got = run(&tree, &dirs, &ev("merge_request_create", "Group", 1, "acme"), false).unwrap().1;
        assert!(!got.contains("acme-off"));
        assert!(dirs.get("acme-off").is_some_and(|d| !d.active));
    }
}
