//! The namespace tree, materialized from `audit.namespaces`, and root
//! ancestor resolution (SPEC §4).

use std::collections::HashMap;

use crate::namespace::{NamespaceKind, NamespaceRecord, NamespaceRef};

/// The longest chain from an entity up to its root that is still believed.
pub const MAX_DEPTH: usize = 20;

/// The known namespaces.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: HashMap<NamespaceRef, NamespaceRecord>,
    /// Top-level groups by full path, for events the tree does not know.
    top_level: HashMap<String, i64>,
}

/// An entity and its ancestors, nearest first; a fixed array, so resolving
/// allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Chain {
    items: [NamespaceRef; MAX_DEPTH + 1],
    len: usize,
}

impl Default for Chain {
    fn default() -> Self {
        Self { items: [NamespaceRef::group(0); MAX_DEPTH + 1], len: 0 }
    }
}

impl Chain {
    fn push(&mut self, r: NamespaceRef) -> bool {
        if self.len > MAX_DEPTH {
            return false;
        }
        self.items[self.len] = r;
        self.len += 1;
        true
    }

    /// Whether `r` is the entity or one of its ancestors.
    pub fn contains(&self, r: NamespaceRef) -> bool {
        self.items[..self.len].contains(&r)
    }

    /// The entity and its ancestors, nearest first.
    pub fn as_slice(&self) -> &[NamespaceRef] {
        &self.items[..self.len]
    }
}

/// Where an entity's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// Under this top-level group.
    Group(i64),
    /// To instance destinations only (users, the instance, personal
    /// namespaces, roots nobody knows).
    InstanceOnly,
}

/// Why the tree could not be believed for an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTree {
    /// A namespace is its own ancestor.
    Cycle,
    /// More than [`MAX_DEPTH`] levels up to the root.
    TooDeep,
}

impl BadTree {
    /// For metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cycle => "cycle",
            Self::TooDeep => "too_deep",
        }
    }
}

impl Tree {
    /// Adds or replaces a namespace.
    pub fn upsert(&mut self, of: NamespaceRef, record: NamespaceRecord) {
        self.unindex(of);
        if of.kind == NamespaceKind::Group && record.parent.is_none() {
            self.top_level.insert(record.full_path.clone(), of.id);
        }
        self.nodes.insert(of, record);
    }

    /// Removes a namespace.
    pub fn remove(&mut self, of: NamespaceRef) {
        self.unindex(of);
        self.nodes.remove(&of);
    }

    fn unindex(&mut self, of: NamespaceRef) {
        if let Some(old) = self.nodes.get(&of)
            && of.kind == NamespaceKind::Group
            && old.parent.is_none()
            && self.top_level.get(&old.full_path) == Some(&of.id)
        {
            self.top_level.remove(&old.full_path);
        }
    }

    /// A namespace's record.
    pub fn get(&self, of: NamespaceRef) -> Option<&NamespaceRecord> {
        self.nodes.get(&of)
    }

    /// How many namespaces are known.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether none is known.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The top-level group with this full path.
    pub fn top_level_by_path(&self, path: &str) -> Option<i64> {
        self.top_level.get(path).copied()
    }

    /// Walks from `entity` to its root. `Ok(None)` when the tree does not
    /// know the entity or one of its ancestors (the caller falls back to the
    /// event's path).
    pub fn resolve(&self, entity: NamespaceRef) -> Result<Option<(Root, Chain)>, BadTree> {
        let mut chain = Chain::default();
        chain.push(entity);
        let mut current = entity;
        loop {
            let Some(record) = self.nodes.get(&current) else {
                return Ok(None);
            };
            match record.parent {
                None => {
                    let root = match current.kind {
                        NamespaceKind::Group => Root::Group(current.id),
                        // A personal namespace, or a parentless project.
                        NamespaceKind::User | NamespaceKind::Project => Root::InstanceOnly,
                    };
                    return Ok(Some((root, chain)));
                }
                Some(parent) => {
                    if chain.contains(parent) {
                        return Err(BadTree::Cycle);
                    }
                    if !chain.push(parent) {
                        return Err(BadTree::TooDeep);
                    }
                    current = parent;
                }
            }
        }
    }
}

impl Tree {
    /// Applies a record of the namespaces topic (`None` = tombstone).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let key = std::str::from_utf8(key).map_err(|_| "namespace key is not UTF-8".to_owned())?;
        let of: NamespaceRef = key.parse()?;
        match value {
            None => self.remove(of),
            Some(bytes) => {
                let record: NamespaceRecord =
                    serde_json::from_slice(bytes).map_err(|e| format!("namespace {key}: {e}"))?;
                record.validate(of).map_err(|e| format!("namespace {key}: {e}"))?;
                self.upsert(of, record);
            }
        }
        Ok(())
    }

    /// Whether `group` is `of` or one of its ancestors (and the chain is
    /// sound).
    pub fn is_under(&self, of: NamespaceRef, group: NamespaceRef) -> bool {
        matches!(self.resolve(of), Ok(Some((_, chain))) if chain.contains(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(parent: Option<NamespaceRef>, path: &str) -> NamespaceRecord {
        NamespaceRecord { parent, full_path: path.into() }
    }

    #[test]
    fn resolves_through_subgroups_and_follows_transfers() {
        let mut t = Tree::default();
        t.upsert(NamespaceRef::group(1), rec(None, "a"));
        t.upsert(NamespaceRef::group(2), rec(Some(NamespaceRef::group(1)), "a/b"));
        t.upsert(NamespaceRef::project(3), rec(Some(NamespaceRef::group(2)), "a/b/p"));
        let (root, chain) = t.resolve(NamespaceRef::project(3)).unwrap().unwrap();
        assert_eq!(root, Root::Group(1));
        assert_eq!(chain.as_slice().len(), 3);
        t.upsert(NamespaceRef::group(9), rec(None, "z"));
        t.upsert(NamespaceRef::group(2), rec(Some(NamespaceRef::group(9)), "z/b"));
        assert_eq!(t.resolve(NamespaceRef::project(3)).unwrap().unwrap().0, Root::Group(9));
    }

    #[test]
    fn personal_namespaces_go_to_instance_only() {
        let mut t = Tree::default();
        t.upsert(NamespaceRef::user(5), rec(None, "alice"));
        t.upsert(NamespaceRef::project(6), rec(Some(NamespaceRef::user(5)), "alice/p"));
        assert_eq!(t.resolve(NamespaceRef::project(6)).unwrap().unwrap().0, Root::InstanceOnly);
    }

    #[test]
    fn cycles_and_deep_chains_are_bad_data() {
        let mut t = Tree::default();
        t.upsert(NamespaceRef::group(1), rec(Some(NamespaceRef::group(2)), "x"));
        t.upsert(NamespaceRef::group(2), rec(Some(NamespaceRef::group(1)), "y"));
        assert_eq!(t.resolve(NamespaceRef::group(1)).unwrap_err(), BadTree::Cycle);
        let mut t = Tree::default();
        t.upsert(NamespaceRef::group(0), rec(None, "g0"));
        for i in 1..=21 {
            t.upsert(NamespaceRef::group(i), rec(Some(NamespaceRef::group(i - 1)), "g"));
        }
        assert!(t.resolve(NamespaceRef::group(20)).unwrap().is_some(), "20 levels up is fine");
        assert_eq!(t.resolve(NamespaceRef::group(21)).unwrap_err(), BadTree::TooDeep);
    }

    #[test]
    fn unknown_entities_and_ancestors_are_none() {
        let mut t = Tree::default();
        assert!(t.resolve(NamespaceRef::project(1)).unwrap().is_none());
        t.upsert(NamespaceRef::project(1), rec(Some(NamespaceRef::group(77)), "g/p"));
        assert!(t.resolve(NamespaceRef::project(1)).unwrap().is_none());
    }

    #[test]
    fn top_level_index_follows_renames_and_deletes() {
        let mut t = Tree::default();
        t.upsert(NamespaceRef::group(1), rec(None, "old"));
        t.upsert(NamespaceRef::group(1), rec(None, "new"));
        assert_eq!(t.top_level_by_path("old"), None);
        assert_eq!(t.top_level_by_path("new"), Some(1));
        t.apply(b"group:1", None).unwrap();
        assert_eq!(t.top_level_by_path("new"), None);
        assert!(t.apply(b"group:1", Some(b"{}")).is_err());
        assert!(t.apply(b"folder:1", Some(b"{}")).is_err());
        assert!(t.apply(b"project:1", Some(br#"{"parent":null,"full_path":"p"}"#)).is_err());
    }
}
