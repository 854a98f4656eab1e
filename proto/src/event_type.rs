//! Event-type definitions and their registry (SPEC §3).
//!
//! Definitions are YAML files, `<name>.yml`, one per type. Those shipped with
//! auditstream live in `proto/event_types/` and are embedded at build time;
//! an operator may add a folder of their own.

use std::{borrow::Cow, collections::HashMap, fmt, path::Path};

use serde_norway::Value;

/// A syntactically valid event type name: lowercase letters, digits and
/// underscores, starting with a letter, at most 128 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct EventTypeName(Cow<'static, str>);

impl EventTypeName {
    /// Longest accepted name.
    pub const MAX_LEN: usize = 128;

    /// A name known at compile time (the generated constants use this).
    pub const fn from_static(name: &'static str) -> Self {
        Self(Cow::Borrowed(name))
    }

    /// Validates a name.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::check(name)?;
        Ok(Self(Cow::Owned(name.to_owned())))
    }

    /// Checks a name without allocating.
    pub fn check(name: &str) -> Result<(), String> {
        let ok = name.len() <= Self::MAX_LEN
            && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{name:?} is not an event type name (lowercase letters, digits and underscores, starting with a letter, at most {} characters)",
                Self::MAX_LEN
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventTypeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an event type may be raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// The whole instance.
    Instance,
    /// A group.
    Group,
    /// A project.
    Project,
    /// A user.
    User,
}

/// One event type definition file, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventTypeDefinition {
    /// The type name; equals the file name.
    pub name: EventTypeName,
    /// How the event is triggered.
    pub description: String,
    /// The issue that introduced it (https URL).
    pub introduced_by_issue: String,
    /// The merge request that introduced it (https URL).
    pub introduced_by_mr: String,
    /// E.g. `compliance_management`; filters may name a whole category.
    pub feature_category: String,
    /// `major.minor`.
    pub milestone: String,
    /// Whether the event is kept in the database.
    pub saved_to_database: bool,
    /// Whether the event is streamed (only streamed events are delivered).
    pub streamed: bool,
    /// Where the event may be raised; never empty.
    pub scope: Vec<Scope>,
}

/// A problem in one definition file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionError {
    /// The file (its name, or path when loaded from disk).
    pub file: String,
    /// The field, when the problem is in one.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: field `{field}`: {}", self.file, self.problem),
            None => write!(f, "{}: {}", self.file, self.problem),
        }
    }
}

const DEFINITION_FIELDS: [&str; 9] = [
    "name",
    "description",
    "introduced_by_issue",
    "introduced_by_mr",
    "feature_category",
    "milestone",
    "saved_to_database",
    "streamed",
    "scope",
];

impl EventTypeDefinition {
    /// Parses and validates one definition. `file_name` is the file's name
    /// (`<name>.yml`); `label` is how errors name the file.
    pub fn parse(file_name: &str, label: &str, yaml: &str) -> Result<Self, Vec<DefinitionError>> {
        let err = |field: Option<&str>, problem: String| DefinitionError {
            file: label.to_owned(),
            field: field.map(str::to_owned),
            problem,
        };
        let value: Value =
            serde_norway::from_str(yaml).map_err(|e| vec![err(None, format!("is not valid YAML: {e}"))])?;
        let Value::Mapping(map) = value else {
            return Err(vec![err(None, "must be a YAML mapping of fields".into())]);
        };
        let mut errors = Vec::new();
        for key in map.keys() {
            match key.as_str() {
                Some(k) if DEFINITION_FIELDS.contains(&k) => {}
                Some(k) => errors.push(err(Some(k), "is not a known field".into())),
                None => errors.push(err(None, format!("has a non-string key {key:?}"))),
            }
        }
        let get = |f: &str| map.get(f);
        let text = |f: &str, errors: &mut Vec<DefinitionError>| -> String {
            match get(f) {
                None => {
                    errors.push(err(Some(f), "is required".into()));
                    String::new()
                }
                Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
                Some(_) => {
                    errors.push(err(Some(f), "must be a non-empty string".into()));
                    String::new()
                }
            }
        };
        let name = text("name", &mut errors);
        let description = text("description", &mut errors);
        let introduced_by_issue = text("introduced_by_issue", &mut errors);
        let introduced_by_mr = text("introduced_by_mr", &mut errors);
        let feature_category = text("feature_category", &mut errors);
        let milestone = text("milestone", &mut errors);

        let stem = file_name.strip_suffix(".yml").unwrap_or(file_name);
        if !name.is_empty() {
            if let Err(problem) = EventTypeName::check(&name) {
                errors.push(err(Some("name"), problem));
            }
            // A file not named `.yml` is refused for that alone, below.
            if name != stem && file_name.ends_with(".yml") {
                errors.push(err(Some("name"), format!("{name:?} must equal the file name {stem:?}")));
            }
        }
        if !file_name.ends_with(".yml") {
            errors.push(err(None, "file name must end in .yml".into()));
        }
        for f in ["introduced_by_issue", "introduced_by_mr"] {
            if let Some(Value::String(s)) = get(f)
                && !is_https_url(s)
            {
                errors.push(err(Some(f), format!("{s:?} is not an https URL")));
            }
        }
        if !feature_category.is_empty() && EventTypeName::check(&feature_category).is_err() {
            errors.push(err(
                Some("feature_category"),
                format!("{feature_category:?} must be lowercase letters, digits and underscores"),
            ));
        }
        if !milestone.is_empty() && !is_milestone(&milestone) {
            errors.push(err(
                Some("milestone"),
                format!("{milestone:?} must look like 16.11 (digits.digits; quote it in YAML)"),
            ));
        }
        let mut flag = |f: &str| match get(f) {
            None => {
                errors.push(err(Some(f), "is required".into()));
                false
            }
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                errors.push(err(Some(f), "must be true or false".into()));
                false
            }
        };
        let saved_to_database = flag("saved_to_database");
        let streamed = flag("streamed");
        if get("saved_to_database") == Some(&Value::Bool(false)) && get("streamed") == Some(&Value::Bool(false)) {
            errors.push(err(
                Some("streamed"),
                "saved_to_database and streamed are both false: the event would go nowhere".into(),
            ));
        }
        let scope = match get("scope") {
            None => {
                errors.push(err(Some("scope"), "is required".into()));
                Vec::new()
            }
            Some(Value::Sequence(items)) if !items.is_empty() => {
                let mut scope = Vec::new();
                for item in items {
                    match item.as_str() {
                        Some("Instance") => scope.push(Scope::Instance),
                        Some("Group") => scope.push(Scope::Group),
                        Some("Project") => scope.push(Scope::Project),
                        Some("User") => scope.push(Scope::User),
                        _ => errors
                            .push(err(Some("scope"), format!("{item:?} is not one of Instance, Group, Project, User"))),
                    }
                }
                scope
            }
            Some(_) => {
                errors.push(err(Some("scope"), "must be a non-empty list of Instance, Group, Project, User".into()));
                Vec::new()
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            name: EventTypeName::parse(&name).map_err(|p| vec![err(Some("name"), p)])?,
            description,
            introduced_by_issue,
            introduced_by_mr,
            feature_category,
            milestone,
            saved_to_database,
            streamed,
            scope,
        })
    }
}

fn is_https_url(s: &str) -> bool {
    s.strip_prefix("https://").is_some_and(|rest| rest.split('/').next().is_some_and(|host| !host.is_empty()))
        && !s.chars().any(char::is_whitespace)
}

fn is_milestone(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The set of known event types, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    types: HashMap<String, EventTypeDefinition>,
}

impl Registry {
    /// The definitions shipped with auditstream.
    pub fn embedded() -> Self {
        let mut types = HashMap::new();
        for (file, yaml) in crate::types::EMBEDDED {
            // The build validates these in tests; a broken one is a bug.
            if let Ok(def) = EventTypeDefinition::parse(file, file, yaml) {
                types.insert(def.name.to_string(), def);
            }
        }
        Self { types }
    }

    /// The shipped definitions plus, when given, an operator's folder of
    /// them (which may replace shipped ones). `Err` lists every problem,
    /// one per line.
    pub fn with_dir(dir: Option<&Path>) -> Result<Self, String> {
        let mut registry = Self::embedded();
        if let Some(dir) = dir {
            let extra = Self::load_dir(dir)
                .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))?;
            registry.extend(extra);
        }
        Ok(registry)
    }

    /// Reads every `*.yml` file of a folder. All problems of all files are
    /// reported, each naming its file and field.
    pub fn load_dir(dir: &Path) -> Result<Self, Vec<DefinitionError>> {
        let dir_err = |problem: String| vec![DefinitionError { file: dir.display().to_string(), field: None, problem }];
        let entries = std::fs::read_dir(dir).map_err(|e| dir_err(format!("cannot read folder: {e}")))?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(dir_err("holds no .yml definition files".into()));
        }
        let mut registry = Self::default();
        let mut errors = Vec::new();
        for path in paths {
            let label = path.display().to_string();
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match std::fs::read_to_string(&path) {
                Ok(yaml) => match EventTypeDefinition::parse(file_name, &label, &yaml) {
                    Ok(def) => {
                        registry.types.insert(def.name.to_string(), def);
                    }
                    Err(e) => errors.extend(e),
                },
                Err(e) => {
                    errors.push(DefinitionError { file: label, field: None, problem: format!("cannot read file: {e}") })
                }
            }
        }
        if errors.is_empty() { Ok(registry) } else { Err(errors) }
    }

    /// Adds (or replaces) the definitions of another registry.
    pub fn extend(&mut self, other: Registry) {
        self.types.extend(other.types);
    }

    /// The definition of a type.
    pub fn get(&self, name: &str) -> Option<&EventTypeDefinition> {
        self.types.get(name)
    }

    /// Whether any type belongs to this feature category.
    pub fn has_category(&self, category: &str) -> bool {
        self.types.values().any(|d| d.feature_category == category)
    }

    /// Every definition, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &EventTypeDefinition> {
        self.types.values()
    }

    /// How many types are registered.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// Whether no type is registered.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: merge_request_create\ndescription: d\nintroduced_by_issue: https://x/1\nintroduced_by_mr: https://x/2\nfeature_category: code_review_workflow\nmilestone: '15.2'\nsaved_to_database: false\nstreamed: true\nscope: [Project]\n";

    #[test]
    fn every_embedded_definition_is_valid() {
        for (file, yaml) in crate::types::EMBEDDED {
            if let Err(e) = EventTypeDefinition::parse(file, file, yaml) {
                panic!("{e:?}");
            }
        }
        assert_eq!(Registry::embedded().len(), crate::types::EMBEDDED.len());
    }

    #[test]
    fn spec_and_example_types_are_registered() {
        let r = Registry::embedded();
        for t in [
            "repository_git_operation",
            "merge_request_create",
            "project_fork_operation",
            "project_group_link_create",
            "project_group_link_update",
            "project_group_link_destroy",
            "audit_operation",
            "security_policy_scheduled_scans_not_enforced",
            "create_instance_event_streaming_destination",
            "update_instance_event_streaming_destination",
            "destroy_instance_event_streaming_destination",
            "create_group_event_streaming_destination",
            "update_group_event_streaming_destination",
            "destroy_group_event_streaming_destination",
        ] {
            assert!(r.get(t).is_some_and(|d| d.streamed), "{t}");
        }
    }

    #[test]
    fn generated_constants_match_definitions() {
        assert_eq!(crate::types::MERGE_REQUEST_CREATE.as_str(), "merge_request_create");
        assert!(Registry::embedded().get(crate::types::AUDIT_OPERATION.as_str()).is_some());
    }

    #[test]
    fn good_definition_parses() {
        let d = EventTypeDefinition::parse("merge_request_create.yml", "f", GOOD).unwrap();
        assert_eq!(d.scope, vec![Scope::Project]);
        assert!(d.streamed);
    }

    fn fields_in_error(file: &str, yaml: &str) -> Vec<Option<String>> {
        EventTypeDefinition::parse(file, file, yaml).unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: &[(&str, &str)] = &[
            ("name", "merge_request_update"),
            ("description", ""),
            ("introduced_by_issue", "http://x/1"),
            ("introduced_by_mr", "not a url"),
            ("feature_category", "Code Review"),
            ("milestone", "15"),
            ("saved_to_database", "maybe"),
            ("scope", "[Namespace]"),
        ];
        for (field, bad) in cases {
            let yaml: String =
                GOOD.lines()
                    .map(|l| {
                        if l.starts_with(&format!("{field}:")) { format!("{field}: {bad}\n") } else { format!("{l}\n") }
                    })
                    .collect();
            let got = fields_in_error("merge_request_create.yml", &yaml);
            assert!(got.contains(&Some(field.to_string())), "{field}: {got:?}");
        }
    }

    #[test]
    fn missing_unknown_and_both_false_fields() {
        let yaml = GOOD.replace("milestone: '15.2'\n", "colour: red\n");
        let got = fields_in_error("merge_request_create.yml", &yaml);
        assert!(got.contains(&Some("milestone".into())));
        assert!(got.contains(&Some("colour".into())));
        let yaml = GOOD.replace("streamed: true", "streamed: false");
        assert_eq!(fields_in_error("merge_request_create.yml", &yaml), vec![Some("streamed".into())]);
        assert_eq!(fields_in_error("x.yml", "- a\n- b\n"), vec![None]);
        assert_eq!(fields_in_error("x.yml", ":\n  - [\n"), vec![None]);
    }

    #[test]
    fn load_dir_reports_every_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("merge_request_create.yml"), GOOD).unwrap();
        std::fs::write(dir.path().join("bad_one.yml"), GOOD).unwrap();
        std::fs::write(dir.path().join("bad_two.yml"), "name: bad_two\n").unwrap();
        let errs = Registry::load_dir(dir.path()).unwrap_err();
        assert!(errs.iter().any(|e| e.file.ends_with("bad_one.yml") && e.field.as_deref() == Some("name")));
        assert!(errs.iter().any(|e| e.file.ends_with("bad_two.yml") && e.field.as_deref() == Some("scope")));
        assert!(!errs.iter().any(|e| e.file.ends_with("merge_request_create.yml")));
    }

    /// The problems `load_dir` reports for `dir`, as "file: problem".
    fn load_problems(dir: &Path) -> Vec<String> {
        Registry::load_dir(dir).unwrap_err().into_iter().map(|e| format!("{}: {}", e.file, e.problem)).collect()
    }

    #[test]
    fn load_dir_names_unusable_folders_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(load_problems(&missing)[0].contains("cannot read folder"), "{:?}", load_problems(&missing));
        // Nothing to load is an error, not an empty registry: a wrong path
        // would otherwise refuse every event.
        std::fs::write(dir.path().join("README.md"), "definitions go here").unwrap();
        let got = load_problems(dir.path());
        assert!(got[0].contains("holds no .yml definition files"), "{got:?}");
        // A `.yaml` file is read, so its mistake is named rather than the
        // file passed over.
        std::fs::write(dir.path().join("merge_request_create.yaml"), GOOD).unwrap();
        let got = load_problems(dir.path());
        let file = dir.path().join("merge_request_create.yaml");
        assert_eq!(got, [format!("{}: file name must end in .yml", file.display())], "one error, not also the name");
        std::fs::remove_file(dir.path().join("merge_request_create.yaml")).unwrap();
        std::fs::write(dir.path().join("latin1.yml"), b"name: caf\xe9\n").unwrap();
        let got = load_problems(dir.path());
        assert!(got.iter().any(|p| p.contains("latin1.yml: cannot read file")), "{got:?}");
    }

    #[test]
    fn scope_must_be_a_non_empty_list_and_keys_strings() {
        for bad in ["scope: Project", "scope: []"] {
            let yaml = GOOD.replace("scope: [Project]", bad);
            let errs = EventTypeDefinition::parse("merge_request_create.yml", "f", &yaml).unwrap_err();
            assert!(
                errs.iter().any(|e| e.field.as_deref() == Some("scope") && e.problem.contains("non-empty list")),
                "{bad}: {errs:?}"
            );
        }
        let errs = EventTypeDefinition::parse("merge_request_create.yml", "f", &format!("{GOOD}1: one\n")).unwrap_err();
        assert!(errs.iter().any(|e| e.field.is_none() && e.problem.contains("non-string key")), "{errs:?}");
    }
}
