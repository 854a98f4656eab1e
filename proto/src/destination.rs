//! Destination configuration (SPEC §5).
//!
//! Values are checked when they are built (a [`VerificationToken`] cannot
//! hold 15 characters), so a `Destination` read back from its compacted topic
//! is as valid as the one written. Secrets print masked in `Debug`.

use std::{collections::HashMap, fmt, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    FieldError, Registry,
    event_type::EventTypeName,
    namespace::{NamespaceKind, NamespaceRef},
};

/// Longest destination name.
pub const MAX_NAME_LEN: usize = 72;
/// Longest destination URL.
pub const MAX_URL_LEN: usize = 255;
/// Most custom headers per destination.
pub const MAX_HEADERS: usize = 20;
/// Longest custom header value.
pub const MAX_HEADER_VALUE_LEN: usize = 255;
/// Most namespace filters per destination.
pub const MAX_NAMESPACE_FILTERS: usize = 5;
/// How a filter entry names a whole feature category rather than a type.
/// A type name cannot contain `:`, so the two can never be confused.
pub const CATEGORY_PREFIX: &str = "category:";

/// Headers auditstream (or HTTP itself) sets; a custom header may not.
/// `Content-Type` is absent on purpose: SPEC §2 lets a destination override it.
pub const RESERVED_HEADERS: [&str; 15] = [
    "x-gitlab-event-streaming-token",
    "x-gitlab-audit-event-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "user-agent",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

/// Who owns a destination, and so which events it may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Owner {
    /// Instance-level: receives every streamed event.
    Instance,
    /// Group-level: receives the events of one top-level group's tree.
    Group {
        /// The top-level group.
        id: i64,
    },
}

/// Where events are sent. Only `http` exists today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// An HTTP(S) endpoint.
    #[default]
    Http,
}

macro_rules! validated_string {
    ($(#[$doc:meta])* $name:ident, $check:path, secret = $secret:expr, read_as = $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps the value.
            pub fn new(value: impl Into<String>) -> Result<Self, String> {
                let value = value.into();
                $check(&value)?;
                Ok(Self(value))
            }
            /// The value. For secrets: do not log it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        /// How a stored record is read: the error names what it is about,
        /// since serde cannot say which field it was reading.
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                Self::new(value).map_err(|e| format!("{} {e}", $label))
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if $secret {
                    write!(f, "{}(***)", stringify!($name))
                } else {
                    write!(f, "{}({:?})", stringify!($name), self.0)
                }
            }
        }
    };
}

fn check_name(v: &str) -> Result<(), String> {
    if v.trim().is_empty() || v.chars().count() > MAX_NAME_LEN || v.chars().any(char::is_control) {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters without control characters"));
    }
    Ok(())
}

fn check_token(v: &str) -> Result<(), String> {
    // Only ASCII passes, so counting bytes is counting characters.
    if !(16..=24).contains(&v.len()) || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be 16 to 24 visible ASCII characters".into());
    }
    Ok(())
}

fn check_url(v: &str) -> Result<(), String> {
    // The URL parser silently strips tabs and newlines: refuse them (and
    // spaces) before it sees the text, so what is stored is what is used.
    if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain spaces or control characters".into());
    }
    // Characters as typed (SPEC §5), not bytes: the parser percent-encodes
    // a non-ASCII path or host for the wire, but the owner's limit is on
    // what they wrote.
    let length = v.chars().count();
    if length > MAX_URL_LEN {
        return Err(format!("is {length} characters, more than {MAX_URL_LEN}"));
    }
    let url = url::Url::parse(v).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; use a custom header instead".into());
    }
    Ok(())
}

fn check_header_name(v: &str) -> Result<(), String> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if v.is_empty() || v.len() > 128 || !v.bytes().all(tchar) {
        return Err(format!("{v:?} is not an HTTP header name (an RFC 9110 token of at most 128 characters)"));
    }
    if RESERVED_HEADERS.contains(&v.to_ascii_lowercase().as_str()) {
        return Err(format!("{v:?} is set by auditstream and cannot be a custom header"));
    }
    Ok(())
}

fn check_header_value(v: &str) -> Result<(), String> {
    if v.chars().count() > MAX_HEADER_VALUE_LEN {
        return Err(format!("is longer than {MAX_HEADER_VALUE_LEN} characters"));
    }
    if v.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn check_signing_secret(v: &str) -> Result<(), String> {
    use base64::Engine as _;
    let b64 = v.strip_prefix("whsec_").ok_or("must start with whsec_ (Standard Webhooks)")?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| "after whsec_ must be base64")?;
    if !(24..=64).contains(&key.len()) {
        return Err("must decode to 24 to 64 bytes of key".into());
    }
    Ok(())
}

validated_string!(
    /// A destination's name: at most 72 characters.
    DestinationName, check_name, secret = false, read_as = "name"
);
validated_string!(
    /// Sent as `X-Gitlab-Event-Streaming-Token`: 16 to 24 visible characters.
    VerificationToken, check_token, secret = true, read_as = "verification_token"
);
validated_string!(
    /// An `http` or `https` URL of at most 255 characters, with no credentials.
    DestinationUrl, check_url, secret = false, read_as = "url"
);
validated_string!(
    /// A custom header's name: an RFC 9110 token, not one auditstream sets.
    HeaderName, check_header_name, secret = false, read_as = "a header's name"
);
validated_string!(
    /// A custom header's value: at most 255 characters, no control
    /// characters. Treated as a secret (it often carries credentials).
    HeaderValue, check_header_value, secret = true, read_as = "a header's value"
);
validated_string!(
    /// A Standard Webhooks signing secret: `whsec_` + base64 of the key.
    SigningSecret, check_signing_secret, secret = true, read_as = "a signing secret"
);

impl SigningSecret {
    /// The raw key bytes the HMAC uses.
    pub fn key(&self) -> Vec<u8> {
        use base64::Engine as _;
        // Validated on construction.
        base64::engine::general_purpose::STANDARD.decode(&self.0["whsec_".len()..]).unwrap_or_default()
    }
}

/// A signing secret being rotated out: deliveries are signed with it too
/// (beside the current one) until `until_ms`, so receivers can switch keys
/// without a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiringSecret {
    /// The previous secret.
    pub secret: SigningSecret,
    /// When it stops being used (Unix milliseconds).
    pub until_ms: i64,
}

/// A custom header sent with every delivery while `active`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomHeader {
    /// Header name.
    pub name: HeaderName,
    /// Header value.
    pub value: HeaderValue,
    /// Only active headers are sent.
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// Which event types a destination receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum EventTypeFilter {
    /// Only these (all types when empty).
    Allow(Vec<String>),
    /// All but these.
    Deny(Vec<String>),
}

impl Default for EventTypeFilter {
    fn default() -> Self {
        Self::Allow(Vec::new())
    }
}

impl EventTypeFilter {
    fn entries(&self) -> &[String] {
        match self {
            Self::Allow(e) | Self::Deny(e) => e,
        }
    }

    /// Whether an event of `event_type` (in `category`, when known) passes.
    pub fn admits(&self, event_type: &str, category: Option<&str>) -> bool {
        let hit = |e: &String| match e.strip_prefix(CATEGORY_PREFIX) {
            Some(c) => category == Some(c),
            None => e == event_type,
        };
        match self {
            Self::Allow(e) => e.is_empty() || e.iter().any(hit),
            Self::Deny(e) => !e.iter().any(hit),
        }
    }
}

/// A destination, as stored in the destinations topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Assigned by the system; the topic key.
    pub id: String,
    /// Instance or a top-level group.
    pub owner: Owner,
    /// Unique within its owner.
    pub name: DestinationName,
    /// `http`.
    #[serde(default)]
    pub category: Category,
    /// Where events are POSTed.
    pub url: DestinationUrl,
    /// Sent as `X-Gitlab-Event-Streaming-Token`.
    pub verification_token: VerificationToken,
    /// When set, deliveries are signed (Standard Webhooks v1).
    #[serde(default)]
    pub signing_secret: Option<SigningSecret>,
    /// The secret being rotated out, still signing until its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_signing_secret: Option<RetiringSecret>,
    /// Custom headers.
    #[serde(default)]
    pub headers: Vec<CustomHeader>,
    /// Event-type allow- or deny-list.
    #[serde(default)]
    pub event_type_filters: EventTypeFilter,
    /// Group or project filters (at most 5).
    #[serde(default)]
    pub namespace_filters: Vec<NamespaceRef>,
    /// An inactive destination receives nothing and keeps its configuration.
    #[serde(default = "yes")]
    pub active: bool,
}

impl Destination {
    /// An active `http` destination with no headers, filters or signing:
    /// every value checked.
    pub fn http(id: &str, owner: Owner, name: &str, url: &str, token: &str) -> Result<Self, String> {
        Ok(Self {
            id: id.into(),
            owner,
            name: DestinationName::new(name)?,
            category: Category::Http,
            url: DestinationUrl::new(url)?,
            verification_token: VerificationToken::new(token)?,
            signing_secret: None,
            previous_signing_secret: None,
            headers: Vec::new(),
            event_type_filters: EventTypeFilter::default(),
            namespace_filters: Vec::new(),
            active: true,
        })
    }

    /// Checks the rules that span fields or need the registry. Field-level
    /// rules are enforced by the value types themselves.
    pub fn validate(&self, registry: &Registry) -> Result<(), Vec<FieldError>> {
        let mut errors = self.shape_errors();
        for (i, entry) in self.event_type_filters.entries().iter().enumerate() {
            let field = format!("event_type_filters[{i}]");
            match entry.strip_prefix(CATEGORY_PREFIX) {
                Some(c) if registry.has_category(c) => {}
                Some(c) => {
                    errors.push(FieldError::new(field, format!("no registered event type has feature_category {c:?}")))
                }
                None if registry.get(entry).is_some() => {}
                None => {
                    let hint = if EventTypeName::check(entry).is_ok() {
                        ""
                    } else {
                        " (to name a feature category, write category:<name>)"
                    };
                    errors.push(FieldError::new(field, format!("{entry:?} is not a registered event type{hint}")));
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// The rules that need no registry: checked on every record read from
    /// the destinations topic too, since a record written around the API
    /// reaches the router and the deliverer unchecked otherwise.
    pub fn validate_shape(&self) -> Result<(), Vec<FieldError>> {
        let errors = self.shape_errors();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn shape_errors(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if self.id.is_empty() || self.id.len() > 64 || !self.id.bytes().all(|b| b.is_ascii_graphic()) {
            errors.push(FieldError::new("id", "must be 1 to 64 visible ASCII characters"));
        }
        if let Owner::Group { id } = self.owner
            && id <= 0
        {
            errors.push(FieldError::new("owner", "group id must be positive"));
        }
        if self.headers.len() > MAX_HEADERS {
            errors.push(FieldError::new(
                "headers",
                format!("has {} headers, more than {MAX_HEADERS}", self.headers.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.headers.iter().enumerate() {
            if !seen.insert(h.name.expose().to_ascii_lowercase()) {
                errors.push(FieldError::new(
                    format!("headers[{i}].name"),
                    format!("{:?} appears twice", h.name.expose()),
                ));
            }
        }
        if self.namespace_filters.len() > MAX_NAMESPACE_FILTERS {
            errors.push(FieldError::new(
                "namespace_filters",
                format!("has {} filters, more than {MAX_NAMESPACE_FILTERS}", self.namespace_filters.len()),
            ));
        }
        for (i, f) in self.namespace_filters.iter().enumerate() {
            if f.kind == NamespaceKind::User {
                errors.push(FieldError::new(format!("namespace_filters[{i}].kind"), "must be group or project"));
            }
        }
        errors
    }

    /// The secrets that sign a delivery made at `now_ms`: the current one,
    /// and the retiring one until its deadline.
    pub fn signing_secrets(&self, now_ms: i64) -> Vec<&SigningSecret> {
        let retiring = self.previous_signing_secret.as_ref().filter(|r| now_ms < r.until_ms).map(|r| &r.secret);
        self.signing_secret.iter().chain(retiring).collect()
    }

    /// The headers to send: active custom headers only.
    pub fn active_headers(&self) -> impl Iterator<Item = &CustomHeader> {
        self.headers.iter().filter(|h| h.active)
    }
}

/// Every destination, indexed the way routing and delivery look them up.
#[derive(Debug, Default)]
pub struct Directory {
    by_id: HashMap<String, Arc<Destination>>,
    instance: Vec<Arc<Destination>>,
    by_group: HashMap<i64, Vec<Arc<Destination>>>,
    /// Ids whose deletion (tombstone) was seen, so "deleted" can be told
    /// apart from "not seen yet".
    removed: std::collections::HashSet<String>,
    /// Opens sealed secrets when records are read.
    keyring: Option<Arc<crate::seal::Keyring>>,
}

impl Directory {
    /// An empty directory whose records' secrets open with `keyring`.
    pub fn with_keyring(keyring: Option<Arc<crate::seal::Keyring>>) -> Self {
        Self { keyring, ..Self::default() }
    }

    /// Reads one record of the destinations topic: opens its sealed
    /// secrets and checks its values.
    pub fn decode(&self, bytes: &[u8]) -> Result<Destination, String> {
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        crate::seal::open_destination(&mut value, self.keyring.as_deref())?;
        let d: Destination = serde_json::from_value(value).map_err(|e| e.to_string())?;
        d.validate_shape().map_err(|errors| crate::event::FieldError::join(&errors))?;
        Ok(d)
    }

    /// Adds or replaces a destination.
    pub fn upsert(&mut self, destination: Destination) {
        self.remove(&destination.id);
        self.removed.remove(&destination.id);
        let d = Arc::new(destination);
        match d.owner {
            Owner::Instance => self.instance.push(d.clone()),
            Owner::Group { id } => self.by_group.entry(id).or_default().push(d.clone()),
        }
        self.by_id.insert(d.id.clone(), d);
    }

    /// Removes a destination, if present.
    pub fn remove(&mut self, id: &str) {
        self.removed.insert(id.to_owned());
        let Some(old) = self.by_id.remove(id) else {
            return;
        };
        match old.owner {
            Owner::Instance => self.instance.retain(|d| d.id != id),
            Owner::Group { id: g } => {
                if let Some(list) = self.by_group.get_mut(&g) {
                    list.retain(|d| d.id != id);
                    if list.is_empty() {
                        self.by_group.remove(&g);
                    }
                }
            }
        }
    }

    /// Whether the destination was deleted (and not recreated since).
    pub fn was_removed(&self, id: &str) -> bool {
        self.removed.contains(id)
    }

    /// A destination by id.
    pub fn get(&self, id: &str) -> Option<&Arc<Destination>> {
        self.by_id.get(id)
    }

    /// Instance-level destinations.
    pub fn instance(&self) -> &[Arc<Destination>] {
        &self.instance
    }

    /// The destinations of a top-level group.
    pub fn group(&self, id: i64) -> &[Arc<Destination>] {
        self.by_group.get(&id).map_or(&[], Vec::as_slice)
    }

    /// How many destinations there are.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every destination, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Destination>> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> Destination {
        Destination {
            id: "d-1".into(),
            owner: Owner::Group { id: 9 },
            name: DestinationName::new("SIEM").unwrap(),
            category: Category::Http,
            url: DestinationUrl::new("https://siem.example.com/in").unwrap(),
            verification_token: VerificationToken::new("0123456789abcdefABCD").unwrap(),
            signing_secret: None,
            previous_signing_secret: None,
            headers: vec![CustomHeader {
                name: HeaderName::new("X-Tenant").unwrap(),
                value: HeaderValue::new("acme").unwrap(),
                active: true,
            }],
            event_type_filters: EventTypeFilter::Allow(vec!["audit_operation".into()]),
            namespace_filters: vec![NamespaceRef::group(10)],
            active: true,
        }
    }

    #[test]
    fn value_rules() {
        assert!(VerificationToken::new("a".repeat(15)).is_err());
        assert!(VerificationToken::new("a".repeat(16)).is_ok());
        assert!(VerificationToken::new("a".repeat(25)).is_err());
        assert!(VerificationToken::new(format!("{}\n", "a".repeat(16))).is_err());
        assert!(DestinationName::new("n".repeat(73)).is_err());
        assert!(DestinationName::new("n".repeat(72)).is_ok());
        assert!(DestinationUrl::new("ftp://x").unwrap_err().contains("scheme"));
        assert!(DestinationUrl::new(format!("https://x/{}", "a".repeat(250))).is_err());
        assert!(DestinationUrl::new("https://u:p@x/").unwrap_err().contains("credentials"));
        assert!(DestinationUrl::new("not a url").is_err());
        assert!(DestinationUrl::new("https://siem.example.com/\r\nX-Injected: 1").unwrap_err().contains("control"));
        assert!(DestinationUrl::new("https://siem.\nexample.com/").is_err());
        assert!(DestinationUrl::new("https://siem.example.com/a\tb").is_err());
        assert!(HeaderName::new("X Bad").is_err());
        assert!(HeaderName::new("X-Gitlab-Event-Streaming-Token").unwrap_err().contains("set by auditstream"));
        assert!(HeaderName::new("Content-Type").is_ok());
        assert!(HeaderValue::new("a\r\nInjected: 1").is_err());
        assert!(HeaderValue::new("v".repeat(256)).is_err());
        assert!(SigningSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert!(SigningSecret::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(SigningSecret::new("whsec_c2hvcnQ=").is_err());
    }

    /// SPEC §5 sets its limits in characters: "é" is one character of two
    /// bytes, so 200 of them fit in 255 and 256 of them do not.
    #[test]
    fn limits_count_characters_not_bytes() {
        assert!(HeaderValue::new("é".repeat(200)).is_ok(), "400 bytes, 200 characters");
        assert!(HeaderValue::new("é".repeat(255)).is_ok());
        let refused = HeaderValue::new("é".repeat(256)).unwrap_err();
        assert!(refused.contains("255 characters"), "{refused}");

        let url = |n: usize| format!("https://x/{}", "é".repeat(n));
        assert!(DestinationUrl::new(url(200)).is_ok(), "210 characters, 410 bytes");
        assert!(DestinationUrl::new(url(245)).is_ok());
        let refused = DestinationUrl::new(url(246)).unwrap_err();
        assert!(refused.contains("is 256 characters"), "{refused}");

        assert!(DestinationName::new("é".repeat(72)).is_ok());
        assert!(DestinationName::new("é".repeat(73)).unwrap_err().contains("72 characters"));
        assert!(VerificationToken::new("é".repeat(10)).is_err(), "20 bytes, but not ASCII");
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let d = sample();
        let dbg = format!("{d:?}");
        assert!(!dbg.contains("0123456789abcdefABCD"), "{dbg}");
        assert!(!dbg.contains("acme"), "{dbg}");
        assert!(dbg.contains("SIEM"));
    }

    #[test]
    fn serde_rejects_invalid_values() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["verification_token"] = "short".into();
        let err = serde_json::from_value::<Destination>(v).unwrap_err().to_string();
        assert!(err.contains("16 to 24"), "{err}");
    }

    #[test]
    fn cross_field_rules() {
        let r = Registry::embedded();
        assert!(sample().validate(&r).is_ok());
        let mut d = sample();
        d.headers = (0..21)
            .map(|i| CustomHeader {
                name: HeaderName::new(format!("X-{i}")).unwrap(),
                value: HeaderValue::new("v").unwrap(),
                active: true,
            })
            .collect();
        d.namespace_filters = (0..6).map(NamespaceRef::group).collect();
        d.event_type_filters = EventTypeFilter::Deny(vec!["nope".into(), "category:nothing".into(), "Bad Name".into()]);
        let errs = d.validate(&r).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"headers"));
        assert!(fields.contains(&"namespace_filters"));
        assert!(fields.contains(&"event_type_filters[0]"));
        assert!(fields.contains(&"event_type_filters[1]"));
        assert!(errs.iter().any(|e| e.problem.contains("category:<name>")));
        let mut d = sample();
        d.headers.push(d.headers[0].clone());
        d.namespace_filters = vec![NamespaceRef::user(1)];
        let errs = d.validate(&r).unwrap_err();
        assert!(errs.iter().any(|e| e.field == "headers[1].name"));
        assert!(errs.iter().any(|e| e.field == "namespace_filters[0].kind"));
    }

    #[test]
    fn retiring_secret_signs_until_its_deadline() {
        let mut d = sample();
        assert!(d.signing_secrets(0).is_empty());
        let a = SigningSecret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = SigningSecret::new("whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").unwrap();
        d.signing_secret = Some(a.clone());
        d.previous_signing_secret = Some(RetiringSecret { secret: b.clone(), until_ms: 1000 });
        assert_eq!(d.signing_secrets(999), vec![&a, &b]);
        assert_eq!(d.signing_secrets(1000), vec![&a]);
    }

    #[test]
    fn filters_admit() {
        let allow = EventTypeFilter::Allow(vec!["a".into(), "category:cm".into()]);
        assert!(allow.admits("a", None));
        assert!(allow.admits("b", Some("cm")));
        assert!(!allow.admits("b", Some("other")));
        assert!(EventTypeFilter::default().admits("anything", None));
        let deny = EventTypeFilter::Deny(vec!["a".into(), "category:cm".into()]);
        assert!(!deny.admits("a", None));
        assert!(!deny.admits("b", Some("cm")));
        assert!(deny.admits("b", None));
    }

    #[test]
    fn directory_indexes_follow_owner_changes() {
        let mut dir = Directory::default();
        dir.upsert(sample());
        assert_eq!(dir.group(9).len(), 1);
        let mut moved = sample();
        moved.owner = Owner::Instance;
        dir.upsert(moved);
        assert!(dir.group(9).is_empty());
        assert_eq!(dir.instance().len(), 1);
        assert_eq!(dir.len(), 1);
        assert!(!dir.was_removed("d-1"));
        dir.remove("d-1");
        assert!(dir.is_empty() && dir.instance().is_empty());
        assert!(dir.was_removed("d-1"));
        dir.remove("d-1");
        dir.upsert(sample());
        assert!(!dir.was_removed("d-1"), "recreated");
    }

    proptest! {
        #[test]
        fn destination_serde_round_trips(
            name in "[A-Za-z0-9 ]{1,72}",
            token in "[A-Za-z0-9]{16,24}",
            hv in "[ -~]{0,255}",
            active in any::<bool>(),
            group in proptest::option::of(1..i64::MAX),
        ) {
            prop_assume!(!name.trim().is_empty());
            let mut d = sample();
            d.name = DestinationName::new(name).unwrap();
            d.verification_token = VerificationToken::new(token).unwrap();
            d.headers[0].value = HeaderValue::new(hv).unwrap();
            d.active = active;
            d.owner = group.map_or(Owner::Instance, |id| Owner::Group { id });
            let json = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<Destination>(&json).unwrap(), d);
        }
    }
}
