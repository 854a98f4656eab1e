//! The namespace tree (SPEC §4): groups, projects and users' personal
//! namespaces. Records live in a compacted topic keyed by [`NamespaceRef`];
//! a tombstone deletes.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The kind of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceKind {
    /// A group (top-level or a subgroup).
    Group,
    /// A project.
    Project,
    /// A user's personal namespace.
    User,
}

impl NamespaceKind {
    /// The lowercase name used in keys and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Group => "group",
            Self::Project => "project",
            Self::User => "user",
        }
    }
}

impl FromStr for NamespaceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" => Ok(Self::Group),
            "project" => Ok(Self::Project),
            "user" => Ok(Self::User),
            other => Err(format!("{other:?} is not a namespace kind (group, project, user)")),
        }
    }
}

/// A namespace by kind and id; the compacted topic's key is `kind:id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamespaceRef {
    /// Its kind.
    pub kind: NamespaceKind,
    /// Its id, unique within the kind.
    pub id: i64,
}

impl NamespaceRef {
    /// A group.
    pub fn group(id: i64) -> Self {
        Self { kind: NamespaceKind::Group, id }
    }
    /// A project.
    pub fn project(id: i64) -> Self {
        Self { kind: NamespaceKind::Project, id }
    }
    /// A user's namespace.
    pub fn user(id: i64) -> Self {
        Self { kind: NamespaceKind::User, id }
    }
}

impl fmt::Display for NamespaceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

impl FromStr for NamespaceRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, id) = s.split_once(':').ok_or_else(|| format!("{s:?} is not a namespace key like group:12"))?;
        Ok(Self { kind: kind.parse()?, id: id.parse().map_err(|_| format!("{id:?} is not an integer id"))? })
    }
}

/// The value of a namespace record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceRecord {
    /// The parent: a group for subgroups and projects, a user for projects in
    /// a personal namespace, `None` for top-level groups and users.
    pub parent: Option<NamespaceRef>,
    /// Full path, e.g. `example-group/example-project`.
    pub full_path: String,
}

/// Longest full path accepted.
pub const MAX_PATH_LEN: usize = 1024;

impl NamespaceRecord {
    /// Checks the record for the namespace `of`; the problem names the field.
    pub fn validate(&self, of: NamespaceRef) -> Result<(), crate::FieldError> {
        use NamespaceKind::*;
        let path = &self.full_path;
        if path.is_empty()
            || path.len() > MAX_PATH_LEN
            || path.starts_with('/')
            || path.ends_with('/')
            || path.contains("//")
            || path.chars().any(char::is_control)
        {
            return Err(crate::FieldError::new(
                "full_path",
                format!(
                    "must be 1 to {MAX_PATH_LEN} characters of slash-separated segments, without control characters"
                ),
            ));
        }
        match (of.kind, self.parent.map(|p| p.kind)) {
            (_, Some(_)) if self.parent == Some(of) => {
                Err(crate::FieldError::new("parent", "a namespace cannot be its own parent"))
            }
            (Group, None | Some(Group)) | (Project, Some(Group | User)) | (User, None) => Ok(()),
            (Project, None) => Err(crate::FieldError::new("parent", "a project needs a parent group or user")),
            (kind, Some(parent)) => Err(crate::FieldError::new(
                "parent",
                format!("a {} cannot have a {} as parent", kind.as_str(), parent.as_str()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parent_rules() {
        let rec = |parent| NamespaceRecord { parent, full_path: "a/b".into() };
        assert!(rec(None).validate(NamespaceRef::group(1)).is_ok());
        assert!(rec(Some(NamespaceRef::group(1))).validate(NamespaceRef::group(2)).is_ok());
        assert!(rec(Some(NamespaceRef::user(1))).validate(NamespaceRef::project(2)).is_ok());
        assert!(rec(None).validate(NamespaceRef::project(2)).is_err());
        assert!(rec(Some(NamespaceRef::project(1))).validate(NamespaceRef::group(2)).is_err());
        assert!(rec(Some(NamespaceRef::group(1))).validate(NamespaceRef::user(2)).is_err());
        assert!(rec(Some(NamespaceRef::group(2))).validate(NamespaceRef::group(2)).is_err());
        let bad = NamespaceRecord { parent: None, full_path: "a//b".into() };
        assert_eq!(bad.validate(NamespaceRef::group(1)).unwrap_err().field, "full_path");
    }

    #[test]
    fn key_errors_are_named() {
        assert!("folder:1".parse::<NamespaceRef>().unwrap_err().contains("namespace kind"));
        assert!("group:x".parse::<NamespaceRef>().unwrap_err().contains("integer"));
        assert!("group".parse::<NamespaceRef>().unwrap_err().contains("like group:12"));
    }

    proptest! {
        #[test]
        fn key_round_trips(kind in 0..3u8, id in any::<i64>()) {
            let kind = [NamespaceKind::Group, NamespaceKind::Project, NamespaceKind::User][kind as usize];
            let r = NamespaceRef { kind, id };
            prop_assert_eq!(r.to_string().parse::<NamespaceRef>().unwrap(), r);
        }

        #[test]
        fn record_serde_round_trips(path in "[a-z]{1,8}(/[a-z]{1,8}){0,4}", parent in proptest::option::of(any::<i64>())) {
            let rec = NamespaceRecord { parent: parent.map(NamespaceRef::group), full_path: path };
            let json = serde_json::to_vec(&rec).unwrap();
            prop_assert_eq!(serde_json::from_slice::<NamespaceRecord>(&json).unwrap(), rec);
        }
    }
}
