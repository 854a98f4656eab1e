//! The routing decision (SPEC §4): which destinations get an event.

use std::sync::Arc;

use proto::{
    EventView, Registry,
    destination::{Destination, Directory},
    namespace::{NamespaceKind, NamespaceRef},
};

use crate::tree::{BadTree, Chain, Root, Tree};

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
            return Err(format!(
                "event type {:?} is not registered",
                event.event_type
            ));
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
                match path
                    .and_then(|p| p.split('/').next())
                    .and_then(|top| tree.top_level_by_path(top))
                {
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
                            || (p.starts_with(&g.full_path)
                                && p.as_bytes().get(g.full_path.len()) == Some(&b'/'))
                    }
                    _ => false,
                },
            },
            NamespaceKind::User => false,
        })
}
