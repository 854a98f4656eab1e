//! The audit event (SPEC §1).
//!
//! An event travels as the exact bytes its publisher sent. Validation reads
//! the known fields without building a tree of the whole document, and
//! completing an event (minting an `id`, stamping `created_at`, writing `null`
//! for absent fields) inserts text after the opening brace, so every byte the
//! publisher sent, unknown fields included, reaches the receiver unchanged.

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::value::RawValue;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::event_type::{EventTypeName, Registry};

/// Every field of SPEC §1, in the order they are filled in when absent.
pub const FIELDS: [&str; 13] = [
    "id",
    "author_id",
    "author_name",
    "entity_id",
    "entity_type",
    "entity_path",
    "target_id",
    "target_type",
    "target_details",
    "event_type",
    "ip_address",
    "created_at",
    "details",
];

/// The longest event id accepted. Ids travel in HTTP headers (`webhook-id`),
/// so they are also restricted to visible ASCII.
pub const MAX_ID_LEN: usize = 128;

/// Whether a string id can be used as is: 1 to [`MAX_ID_LEN`] visible ASCII
/// characters.
fn id_fits(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The deepest nesting of arrays and objects accepted. Receivers parse what
/// we deliver; a document nested thousands deep crashes many parsers.
pub const MAX_DEPTH: usize = 64;

/// Whether the JSON text nests arrays and objects deeper than `limit`.
/// One pass over the bytes, string contents skipped.
fn nests_deeper_than(text: &str, limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A problem with one field of one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// The field, or `(event)` for the event as a whole.
    pub field: String,
    /// What is wrong, in words a publisher can act on.
    pub problem: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }

    fn whole(problem: impl Into<String>) -> Self {
        Self::new("(event)", problem)
    }

    /// Every problem in one line, `field: problem; field: problem`.
    pub fn join(errors: &[FieldError]) -> String {
        errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Limits and switches applied when validating an event.
#[derive(Debug, Clone)]
pub struct EventLimits {
    /// Largest accepted event, in bytes.
    pub max_event_bytes: usize,
    /// Accept event types that have no definition (they are then streamed).
    pub accept_unknown_types: bool,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self { max_event_bytes: 1024 * 1024, accept_unknown_types: false }
    }
}

/// The unique, stable identifier of an event: receivers deduplicate on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventId {
    /// An integer id, as GitLab's database ids are.
    Int(i64),
    /// A string id, such as the UUIDv7 the producer mints.
    Str(String),
}

impl EventId {
    /// The id as text, without allocating: an integer is written into
    /// `digits`.
    pub fn text<'a>(&'a self, digits: &'a mut itoa::Buffer) -> &'a str {
        match self {
            Self::Int(i) => digits.format(*i),
            Self::Str(s) => s,
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// The fields of an event that the pipeline reads, borrowed from its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventView<'a> {
    /// `id`, when present.
    pub id: Option<EventId>,
    /// `event_type`.
    pub event_type: Cow<'a, str>,
    /// `entity_type`, e.g. `Project`.
    pub entity_type: Cow<'a, str>,
    /// `entity_id`.
    pub entity_id: i64,
    /// `entity_path`, when present and not null.
    pub entity_path: Option<Cow<'a, str>>,
    /// `created_at`, when present (validated as RFC 3339).
    pub created_at: Option<Cow<'a, str>>,
    /// Fields of SPEC §1 absent from the document (not merely null).
    pub missing: Missing,
}

/// Which fields of [`FIELDS`] a document lacks: a set of positions, kept
/// without allocating.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Missing(u16);

impl Missing {
    /// The fields absent where `present` is false, in [`FIELDS`] order.
    fn of(present: impl IntoIterator<Item = bool>) -> Self {
        Self(present.into_iter().enumerate().filter(|(_, p)| !p).fold(0, |set, (i, _)| set | 1 << i))
    }

    /// Whether every field is present.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The absent fields, in [`FIELDS`] order.
    pub fn iter(self) -> impl Iterator<Item = &'static str> {
        FIELDS.iter().enumerate().filter(move |(i, _)| self.0 & 1 << i != 0).map(|(_, f)| *f)
    }
}

impl fmt::Debug for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Reads each known field as raw text; unknown fields are skipped. A
/// duplicated known field is an error, so no two readers can disagree on it.
#[derive(Deserialize)]
struct RawFields<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    author_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    author_name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    entity_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    entity_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    entity_path: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    target_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    target_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    target_details: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ip_address: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    created_at: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    details: Option<&'a RawValue>,
}

/// `Some(raw)` for any present value, `null` included (serde's `Option`
/// would turn `null` into `None` and hide that the key exists).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    fn of(raw: &RawValue) -> Self {
        match raw.get().as_bytes().first() {
            Some(b'n') => Self::Null,
            Some(b't' | b'f') => Self::Bool,
            Some(b'"') => Self::String,
            Some(b'[') => Self::Array,
            Some(b'{') => Self::Object,
            _ => Self::Number,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Number => "a number",
            Self::String => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        }
    }
}

fn string<'a>(raw: &'a RawValue) -> Cow<'a, str> {
    match serde_json::from_str::<&'a str>(raw.get()) {
        Ok(s) => Cow::Borrowed(s),
        // Escapes present: unescape into an owned string. The raw value was
        // already parsed as a JSON string, so this cannot fail.
        Err(_) => Cow::Owned(serde_json::from_str::<String>(raw.get()).unwrap_or_default()),
    }
}

fn integer(raw: &RawValue) -> Option<i64> {
    serde_json::from_str::<i64>(raw.get()).ok()
}

/// Checks that a present field has one of the allowed kinds.
fn expect(errors: &mut Vec<FieldError>, field: &str, raw: Option<&RawValue>, allowed: &[Kind], wanted: &str) {
    let Some(raw) = raw else { return };
    let kind = Kind::of(raw);
    if !allowed.contains(&kind) {
        errors.push(FieldError::new(field, format!("must be {wanted}, found {}", kind.name())));
    } else if kind == Kind::Number && integer(raw).is_none() {
        errors.push(FieldError::new(field, format!("must be {wanted}; {} is not a 64-bit integer", raw.get())));
    }
}

/// What each field of [`FIELDS`] may hold (in the same order), and the
/// words for it in an error.
const RULES: [(&[Kind], &str); FIELDS.len()] = {
    use Kind::*;
    [
        (&[Number, String], "a string or an integer (omit it to have one minted)"),
        (&[Number, Null], "an integer"),
        (&[String, Null], "a string"),
        (&[Number], "an integer"),
        (&[String], "a string"),
        (&[String, Null], "a string"),
        (&[Number, String, Null], "an integer or a string"),
        (&[String, Null], "a string"),
        (&[String, Object, Null], "a string or an object"),
        (&[String], "a string"),
        (&[String, Null], "a string"),
        (&[String], "an RFC 3339 timestamp string (omit it to default to now)"),
        (&[Object, Null], "an object"),
    ]
};

/// Any JSON value, read as strictly as `serde_json::Value` reads it (lone
/// surrogate escapes and numbers beyond f64 are errors) but kept nowhere:
/// no allocation per node. `depth` containers are already open around it;
/// one more than [`MAX_DEPTH`] is an error.
#[derive(Clone, Copy)]
struct Bounded {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Bounded {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Bounded {
    /// The seed for what is inside a container opened here.
    fn inner<E: serde::de::Error>(self) -> Result<Self, E> {
        match self.depth + 1 {
            depth if depth > MAX_DEPTH => Err(E::custom(format_args!("nests deeper than {MAX_DEPTH} levels"))),
            depth => Ok(Self { depth }),
        }
    }
}

impl<'de> Visitor<'de> for Bounded {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while map.next_entry_seed(inner, inner)?.is_some() {}
        Ok(())
    }
}

/// A known field's value as the one-pass reader keeps it: what a check
/// needs, borrowed from the document where it can be.
#[derive(Debug)]
enum Val<'a> {
    Null,
    Bool,
    /// A number that is a 64-bit integer.
    Int(i64),
    /// Any other number.
    Number,
    Str(Cow<'a, str>),
    Array,
    Object,
}

impl Val<'_> {
    fn kind(&self) -> Kind {
        match self {
            Self::Null => Kind::Null,
            Self::Bool => Kind::Bool,
            Self::Int(_) | Self::Number => Kind::Number,
            Self::Str(_) => Kind::String,
            Self::Array => Kind::Array,
            Self::Object => Kind::Object,
        }
    }
}

/// Reads a known field's value (inside the top-level object) into a [`Val`].
struct Known;

impl<'de> DeserializeSeed<'de> for Known {
    type Value = Val<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Known {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Val<'de>, E> {
        Ok(Val::Bool)
    }

    fn visit_i64<E>(self, v: i64) -> Result<Val<'de>, E> {
        Ok(Val::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Val<'de>, E> {
        Ok(i64::try_from(v).map_or(Val::Number, Val::Int))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Val<'de>, E> {
        Ok(Val::Number)
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_unit<E>(self) -> Result<Val<'de>, E> {
        Ok(Val::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Val<'de>, A::Error> {
        Bounded { depth: 1 }.visit_seq(seq).map(|()| Val::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Val<'de>, A::Error> {
        Bounded { depth: 1 }.visit_map(map).map(|()| Val::Object)
    }
}

/// A top-level key: its position in [`FIELDS`], `None` for any other.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(FIELDS.iter().position(|f| *f == v))
    }
}

/// The whole document in one strict, depth-bounded pass: every value
/// checked as [`Bounded`] checks it, the known fields kept as [`Val`]s.
struct Scan<'a>([Option<Val<'a>>; FIELDS.len()]);

impl<'de> Deserialize<'de> for Scan<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ScanVisitor)
    }
}

struct ScanVisitor;

impl<'de> Visitor<'de> for ScanVisitor {
    type Value = Scan<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an audit event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan<'de>, A::Error> {
        let mut values: [Option<Val<'de>>; FIELDS.len()] = Default::default();
        while let Some(key) = map.next_key_seed(Key)? {
            match key {
                Some(i) if values[i].is_some() => return Err(serde::de::Error::duplicate_field(FIELDS[i])),
                Some(i) => values[i] = Some(map.next_value_seed(Known)?),
                None => map.next_value_seed(Bounded { depth: 1 })?,
            }
        }
        Ok(Scan(values))
    }
}

impl<'a> EventView<'a> {
    /// Reads and type-checks the fields of SPEC §1 from an event's bytes.
    ///
    /// Every problem found is reported, not only the first. Registration of
    /// the event type is checked separately ([`EventView::check_type`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Vec<FieldError>> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            vec![FieldError::whole(format!("is not valid UTF-8 (invalid byte at offset {})", e.valid_up_to()))]
        })?;
        // A struct also deserializes from a JSON array, by position: refuse
        // anything but an object before serde sees it.
        match text.trim_start().as_bytes().first() {
            Some(b'{') => {}
            None => return Err(vec![FieldError::whole("is empty")]),
            Some(_) => return Err(vec![FieldError::whole("must be a JSON object")]),
        }
        Self::read(text).map_or_else(|| Self::report(text), Ok)
    }

    /// The common case in one pass: a valid event is read and checked as
    /// it is scanned. `None` when anything is wrong; [`Self::report`] then
    /// names every problem. It accepts exactly what `report` accepts, and
    /// reads the same view (a test holds the two to that).
    fn read(text: &'a str) -> Option<Self> {
        let Scan(values) = serde_json::from_str(text).ok()?;
        for (value, (allowed, _)) in values.iter().zip(RULES) {
            match value {
                Some(Val::Number) => return None,
                Some(v) if !allowed.contains(&v.kind()) => return None,
                _ => {}
            }
        }
        let missing = Missing::of(values.iter().map(Option::is_some));
        let [id, _, _, entity_id, entity_type, entity_path, _, _, _, event_type, _, created_at, _] = values;
        let str = |v: Option<Val<'a>>| match v {
            Some(Val::Str(s)) => Some(s),
            _ => None,
        };
        let id = match id {
            Some(Val::Str(s)) if id_fits(&s) => Some(EventId::Str(s.into_owned())),
            Some(Val::Int(i)) => Some(EventId::Int(i)),
            None => None,
            Some(_) => return None,
        };
        let Some(Val::Int(entity_id)) = entity_id else { return None };
        let event_type = str(event_type).filter(|t| EventTypeName::check(t).is_ok())?;
        let entity_type = str(entity_type).filter(|t| !t.is_empty())?;
        let created_at = match created_at {
            Some(Val::Str(s)) if OffsetDateTime::parse(&s, &Rfc3339).is_ok() => Some(s),
            None => None,
            Some(_) => return None,
        };
        Some(Self { id, event_type, entity_type, entity_id, entity_path: str(entity_path), created_at, missing })
    }

    /// Reads the event again, field by field, reporting every problem.
    fn report(text: &'a str) -> Result<Self, Vec<FieldError>> {
        if nests_deeper_than(text, MAX_DEPTH) {
            return Err(vec![FieldError::whole(format!("nests arrays and objects deeper than {MAX_DEPTH} levels"))]);
        }
        // Fields the pipeline does not read are skipped leniently below; a
        // receiver's strict parser is not: refuse lone surrogate escapes and
        // numbers beyond f64 anywhere in the document.
        let mut strict = serde_json::Deserializer::from_str(text);
        if let Err(e) = (Bounded { depth: 0 }).deserialize(&mut strict).and_then(|()| strict.end()) {
            return Err(vec![FieldError::whole(format!("is not valid JSON: {e}"))]);
        }
        let raw: RawFields<'a> =
            serde_json::from_str(text).map_err(|e| vec![FieldError::whole(format!("is not valid JSON: {e}"))])?;

        let mut errors = Vec::new();
        let raws = [
            raw.id,
            raw.author_id,
            raw.author_name,
            raw.entity_id,
            raw.entity_type,
            raw.entity_path,
            raw.target_id,
            raw.target_type,
            raw.target_details,
            raw.event_type,
            raw.ip_address,
            raw.created_at,
            raw.details,
        ];
        for ((field, (allowed, wanted)), raw) in FIELDS.iter().zip(RULES).zip(raws) {
            expect(&mut errors, field, raw, allowed, wanted);
        }

        for (field, value) in
            [("entity_id", raw.entity_id), ("entity_type", raw.entity_type), ("event_type", raw.event_type)]
        {
            if value.is_none() {
                errors.push(FieldError::new(field, "is required"));
            }
        }

        let id = match raw.id {
            Some(r) if Kind::of(r) == Kind::String => {
                let s = string(r);
                if !id_fits(&s) {
                    errors.push(FieldError::new(
                        "id",
                        format!(
                            "must be 1 to {MAX_ID_LEN} visible ASCII characters (it is sent as the webhook-id header)"
                        ),
                    ));
                }
                Some(EventId::Str(s.into_owned()))
            }
            Some(r) => integer(r).map(EventId::Int),
            None => None,
        };

        let event_type = raw.event_type.filter(|r| Kind::of(r) == Kind::String).map(string);
        if let Some(t) = &event_type
            && let Err(problem) = EventTypeName::check(t)
        {
            errors.push(FieldError::new("event_type", problem));
        }
        let entity_type = raw.entity_type.filter(|r| Kind::of(r) == Kind::String).map(string);
        if entity_type.as_deref() == Some("") {
            errors.push(FieldError::new("entity_type", "must not be empty"));
        }
        if let Some(r) = raw.created_at.filter(|r| Kind::of(r) == Kind::String) {
            let s = string(r);
            if OffsetDateTime::parse(&s, &Rfc3339).is_err() {
                errors.push(FieldError::new(
                    "created_at",
                    format!("{s:?} is not an RFC 3339 timestamp like 2022-02-23T06:21:05.283Z"),
                ));
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        let missing = Missing::of(raws.iter().map(Option::is_some));
        Ok(Self {
            id,
            // Both were checked present and strings above.
            event_type: event_type.unwrap_or_default(),
            entity_type: entity_type.unwrap_or_default(),
            entity_id: raw.entity_id.and_then(integer).unwrap_or_default(),
            entity_path: raw.entity_path.filter(|r| Kind::of(r) == Kind::String).map(string),
            created_at: raw.created_at.map(string),
            missing,
        })
    }

    /// Checks the event type against the registry: registered (unless
    /// unknown types are accepted) and streamed.
    pub fn check_type(&self, registry: &Registry, accept_unknown: bool) -> Result<(), FieldError> {
        match registry.get(&self.event_type) {
            Some(def) if def.streamed => Ok(()),
            Some(_) => Err(FieldError::new(
                "event_type",
                format!("{:?} is registered with streamed: false, so it is never delivered", self.event_type),
            )),
            None if accept_unknown => Ok(()),
            None => Err(FieldError::new("event_type", format!("{:?} is not a registered event type", self.event_type))),
        }
    }
}

/// An event that passed validation, completed, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedEvent {
    /// The bytes every receiver gets, on every attempt and destination.
    pub bytes: Vec<u8>,
    /// The event id (minted when the publisher gave none).
    pub id: EventId,
    /// The event type.
    pub event_type: String,
    /// `entity_type`, part of the partition key.
    pub entity_type: String,
    /// `entity_id`, part of the partition key.
    pub entity_id: i64,
}

impl PreparedEvent {
    /// The Kafka partition key: the entity, so one entity's events keep their
    /// order.
    pub fn partition_key(&self) -> String {
        partition_key(&self.entity_type, self.entity_id)
    }
}

/// The Kafka partition key of an entity: `entity_type:entity_id`.
pub fn partition_key(entity_type: &str, entity_id: i64) -> String {
    let mut key = String::with_capacity(entity_type.len() + 21);
    write_partition_key(&mut key, entity_type, entity_id);
    key
}

/// Writes [`partition_key`] into `key`, replacing what it held: a buffer
/// reused from event to event.
pub fn write_partition_key(key: &mut String, entity_type: &str, entity_id: i64) {
    key.clear();
    key.push_str(entity_type);
    key.push(':');
    key.push_str(itoa::Buffer::new().format(entity_id));
}

/// Reads an RFC 3339 timestamp as Unix milliseconds (`None` when it is not
/// one, or is out of range).
pub fn timestamp_ms(text: &str) -> Option<i64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats a timestamp as SPEC §1 wants it: RFC 3339, milliseconds, UTC.
pub fn format_timestamp(at: OffsetDateTime) -> String {
    let mut out = Vec::with_capacity(24);
    write_timestamp(&mut out, at);
    String::from_utf8(out).unwrap_or_default()
}

/// Appends [`format_timestamp`]'s text to `out`.
fn write_timestamp(out: &mut Vec<u8>, at: OffsetDateTime) {
    use std::io::Write as _;
    let at = at.to_offset(time::UtcOffset::UTC);
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    );
}

/// Whether `created_at` already reads as SPEC §1 writes it:
/// `2022-02-23T06:21:05.283Z` (UTC, milliseconds). Checked on text that
/// parsed as RFC 3339.
pub fn is_canonical_timestamp(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Completes an event that [`EventView::parse`] read from `text` so that
/// it carries every field of SPEC §1 as SPEC §1 writes it: `id` as given
/// (the caller mints one when absent), `created_at` = `now()` when absent
/// (asked only then),
/// `null` for every other absent field, and a `created_at` given in
/// another RFC 3339 form (an offset, more or fewer fraction digits)
/// rewritten in UTC with milliseconds: the same instant, sub-millisecond
/// digits dropped. The publisher's other bytes are kept; completions are
/// inserted after `{`. `None` when the event is complete as it is.
pub fn complete(bytes: &[u8], view: &EventView<'_>, id: &EventId, now: impl Fn() -> OffsetDateTime) -> Option<Vec<u8>> {
    let other_form = view.created_at.as_deref().filter(|at| !is_canonical_timestamp(at));
    if view.missing.is_empty() && other_form.is_none() {
        return None;
    }
    // parse() checked the document is UTF-8 and an object.
    let text = std::str::from_utf8(bytes).ok()?.trim();
    // The value's place in `text`, when it has to be rewritten.
    let rewrite = other_form.and_then(|at| Some((OffsetDateTime::parse(at, &Rfc3339).ok()?, created_at_span(text)?)));
    if view.missing.is_empty() && rewrite.is_none() {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + 64 + 24 * FIELDS.len());
    out.push(b'{');
    for (n, field) in view.missing.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(field.as_bytes());
        out.extend_from_slice(b"\":");
        match field {
            "id" => {
                out.push(b'"');
                out.extend_from_slice(id.text(&mut itoa::Buffer::new()).as_bytes());
                out.push(b'"');
            }
            "created_at" => {
                out.push(b'"');
                write_timestamp(&mut out, now());
                out.push(b'"');
            }
            _ => out.extend_from_slice(b"null"),
        }
    }
    // `{`, the completions, then the publisher's text after its `{`.
    let rest = &text[1..];
    // Required fields are present, so the object is never empty here.
    if !view.missing.is_empty() && !rest.trim_start().starts_with('}') {
        out.push(b',');
    }
    match rewrite {
        Some((at, span)) => {
            // `span` is the value's place in `text`; `rest` starts one later.
            out.extend_from_slice(&rest.as_bytes()[..span.start - 1]);
            out.push(b'"');
            write_timestamp(&mut out, at);
            out.push(b'"');
            out.extend_from_slice(&rest.as_bytes()[span.end - 1..]);
        }
        None => out.extend_from_slice(rest.as_bytes()),
    }
    Some(out)
}

/// Where the `created_at` value (its quotes included) lies in `text`, an
/// object [`EventView::parse`] accepted.
fn created_at_span(text: &str) -> Option<std::ops::Range<usize>> {
    let raw: RawFields<'_> = serde_json::from_str(text).ok()?;
    let value = raw.created_at?.get();
    // The raw value borrows from `text`: its offset is the distance between them.
    let start = (value.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    (start + value.len() <= text.len()).then(|| start..start + value.len())
}

/// Validates an event and completes it ([`complete`]), minting a UUIDv7
/// `id` when absent.
pub fn prepare(
    bytes: &[u8],
    registry: &Registry,
    limits: &EventLimits,
    now: OffsetDateTime,
) -> Result<PreparedEvent, Vec<FieldError>> {
    if bytes.len() > limits.max_event_bytes {
        return Err(vec![FieldError::whole(format!(
            "is {} bytes, more than the limit of {} bytes",
            bytes.len(),
            limits.max_event_bytes
        ))]);
    }
    let mut view = EventView::parse(bytes)?;
    view.check_type(registry, limits.accept_unknown_types).map_err(|e| vec![e])?;

    let id = match view.id.take() {
        Some(id) => id,
        None => EventId::Str(uuid::Uuid::now_v7().to_string()),
    };
    // parse() checked the document is UTF-8 and an object.
    let out = complete(bytes, &view, &id, || now)
        .unwrap_or_else(|| std::str::from_utf8(bytes).unwrap_or_default().trim().as_bytes().to_vec());
    Ok(PreparedEvent {
        bytes: out,
        id,
        event_type: view.event_type.into_owned(),
        entity_type: view.entity_type.into_owned(),
        entity_id: view.entity_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn registry() -> Registry {
        Registry::embedded()
    }

    #[test]
    fn an_id_reads_as_the_text_it_displays_as() {
        let mut digits = itoa::Buffer::new();
        for id in [EventId::Int(-7), EventId::Int(i64::MAX), EventId::Str("0195-a".into()), EventId::Str(String::new())]
        {
            assert_eq!(id.text(&mut digits), id.to_string());
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-11-21 10:00:00.123 UTC);

    fn minimal() -> &'static str {
        r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6}"#
    }

    #[test]
    fn complete_event_keeps_its_exact_bytes() {
        let body = r#"{"id":7,"author_id":1,"author_name":"a","entity_id":6,"entity_type":"Project","entity_path":"g/p","target_id":1,"target_type":"X","target_details":"d","event_type":"audit_operation","ip_address":"","created_at":"2022-03-09T06:53:11.181Z","details":{"k":[1, 2.50]},"extra":true}"#;
        let p = prepare(body.as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap();
        assert_eq!(p.bytes, body.as_bytes());
        assert_eq!(p.id, EventId::Int(7));
    }

    #[test]
    fn missing_fields_are_filled_and_original_text_kept() {
        let p = prepare(minimal().as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap();
        let text = std::str::from_utf8(&p.bytes).unwrap();
        assert!(text.ends_with(&minimal()[1..]), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&p.bytes).unwrap();
        for f in FIELDS {
            assert!(v.get(f).is_some(), "{f} missing from {text}");
        }
        assert_eq!(v["created_at"], "2026-11-21T10:00:00.123Z");
        assert_eq!(v["author_name"], serde_json::Value::Null);
        let EventId::Str(id) = &p.id else { panic!("minted id is a string") };
        let uuid = uuid::Uuid::parse_str(id).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(v["id"], id.as_str());
    }

    #[test]
    fn created_at_in_another_rfc3339_form_is_rewritten_in_utc_milliseconds() {
        let complete = r#"{"id":7,"author_id":1,"author_name":"a","entity_id":6,"entity_type":"Project","entity_path":"g/p","target_id":1,"target_type":"X","target_details":"d","event_type":"audit_operation","ip_address":"","created_at":"AT","details":{},"extra":true}"#;
        for (given, delivered) in [
            ("2022-02-23T08:21:05.283456+02:00", "2022-02-23T06:21:05.283Z"),
            ("2022-02-23T06:21:05Z", "2022-02-23T06:21:05.000Z"),
            ("2022-02-23t06:21:05.2z", "2022-02-23T06:21:05.200Z"),
            ("2022-02-22T23:51:05.283-06:30", "2022-02-23T06:21:05.283Z"),
        ] {
            let body = complete.replace("AT", given);
            let p = prepare(body.as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap();
            assert_eq!(String::from_utf8(p.bytes).unwrap(), complete.replace("AT", delivered), "{given}");
        }
        // With fields to fill in as well: both at once, the value in place.
        let body = r#"{"event_type":"audit_operation","created_at":"2022-02-23T06:21:05+00:00","entity_type":"Project","entity_id":6}"#;
        let p = prepare(body.as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap();
        let text = String::from_utf8(p.bytes).unwrap();
        assert!(
            text.ends_with(r#""event_type":"audit_operation","created_at":"2022-02-23T06:21:05.000Z","entity_type":"Project","entity_id":6}"#),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["author_name"], serde_json::Value::Null);
        assert_eq!(text.matches("created_at").count(), 1);
    }

    #[test]
    fn only_the_spec_form_of_a_timestamp_is_canonical() {
        assert!(is_canonical_timestamp("2022-02-23T06:21:05.283Z"));
        assert_eq!(format_timestamp(datetime!(2022-02-23 06:21:05.283 UTC)), "2022-02-23T06:21:05.283Z");
        for other in [
            "2022-02-23T06:21:05Z",
            "2022-02-23T06:21:05.2831Z",
            "2022-02-23t06:21:05.283Z",
            "2022-02-23T06:21:05.283z",
            "2022-02-23T06:21:05.283+00:00",
            "2022-02-23 06:21:05.283Z",
        ] {
            assert!(!is_canonical_timestamp(other), "{other}");
        }
    }

    #[test]
    fn a_complete_event_in_the_spec_form_needs_no_completing() {
        let body = r#"{"id":7,"author_id":1,"author_name":"a","entity_id":6,"entity_type":"Project","entity_path":"g/p","target_id":1,"target_type":"X","target_details":"d","event_type":"audit_operation","ip_address":"","created_at":"2022-03-09T06:53:11.181Z","details":{}}"#;
        let view = EventView::parse(body.as_bytes()).unwrap();
        assert_eq!(complete(body.as_bytes(), &view, &EventId::Int(7), || NOW), None);
    }

    #[test]
    fn present_nulls_are_not_duplicated() {
        let body = r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"author_name":null}"#;
        let p = prepare(body.as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap();
        let text = std::str::from_utf8(&p.bytes).unwrap();
        assert_eq!(text.matches("\"author_name\"").count(), 1);
    }

    fn problems(body: &str) -> Vec<FieldError> {
        prepare(body.as_bytes(), &registry(), &EventLimits::default(), NOW).unwrap_err()
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let errs = problems(r#"{"id":null,"author_id":"x","entity_id":1.5,"details":[],"created_at":"yesterday"}"#);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in ["id", "author_id", "entity_id", "details", "created_at", "entity_type", "event_type"] {
            assert!(fields.contains(&f), "{f} not reported in {errs:?}");
        }
    }

    #[test]
    fn rejects_non_objects_and_bad_encoding() {
        assert_eq!(problems("[1,2]")[0].problem, "must be a JSON object");
        assert_eq!(problems("  ")[0].problem, "is empty");
        assert!(problems("{\"a\":\"\u{0}\"").first().unwrap().problem.contains("not valid JSON"));
        let errs = prepare(b"{\"a\":\"\xff\"}", &registry(), &EventLimits::default(), NOW).unwrap_err();
        assert!(errs[0].problem.contains("UTF-8"), "{errs:?}");
    }

    #[test]
    fn rejects_what_strict_parsers_refuse_anywhere() {
        for body in [
            r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"details":{"a":"\ud800"}}"#,
            r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"x":1e399}"#,
            r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"\udc00k":1}"#,
            r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"x":[1,{"y":[-1e400]}]}"#,
        ] {
            let errs = problems(body);
            assert!(errs[0].problem.contains("not valid JSON"), "{body}: {errs:?}");
        }
        let ok = r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"d":{"e":"\ud83d\ude00"}}"#;
        assert!(prepare(ok.as_bytes(), &registry(), &EventLimits::default(), NOW).is_ok(), "a surrogate pair is fine");
    }

    /// Documents exercising every rule: each field holding each kind of
    /// value, strictness, nesting, duplicates, escaped names.
    fn rule_cases() -> Vec<String> {
        let golden: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden"))
            .expect("golden examples")
            .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("readable"))
            .collect();
        let values = [
            "null",
            "true",
            "7",
            "-7",
            "-0",
            "6.5",
            "1e3",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "1e400",
            r#""""#,
            r#""x""#,
            r#""a b""#,
            r#""audit_operation""#,
            r#""Audit""#,
            r#""2022-03-09T06:53:11.181Z""#,
            r#""yesterday""#,
            r#""\u0041\n""#,
            r#""\ud800""#,
            r#""\ud83d\ude00""#,
            "[]",
            "{}",
            r#"{"a":[1,{"b":"\ud800"}]}"#,
            r#"{"a":[1e999]}"#,
        ];
        let base = minimal();
        let mut cases = golden;
        for field in FIELDS.iter().chain(["other", "i\\u0064"].iter()) {
            for value in values {
                cases.push(format!(r#"{{"{field}":{value},{}"#, &base[1..]));
                cases.push(format!(r#"{},"{field}":{value}}}"#, &base[..base.len() - 1]));
            }
        }
        for field in ["event_type", "entity_type", "entity_id"] {
            let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(base).unwrap();
            v.remove(field);
            cases.push(serde_json::to_string(&v).unwrap());
        }
        for depth in [62, 63, 64, 65, 200] {
            let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
            cases.push(format!(r#"{},"details":{{"a":{}}}}}"#, &base[..base.len() - 1], nest(depth - 2)));
            cases.push(format!(r#"{},"x":{}}}"#, &base[..base.len() - 1], nest(depth - 1)));
        }
        cases.push(format!(r#"{} x"#, base));
        cases.push(format!(r#"{}  "#, base));
        cases.push(format!(r#"{},"\udc00k":1}}"#, &base[..base.len() - 1]));
        cases.push(format!(r#"{},"x":1,"x":2}}"#, &base[..base.len() - 1]));
        cases
    }

    #[test]
    fn the_one_pass_reader_agrees_with_the_reporting_one() {
        let (mut read, mut refused) = (0, 0);
        for text in rule_cases() {
            let fast = EventView::read(&text);
            match EventView::report(&text) {
                Ok(view) => {
                    assert_eq!(fast.as_ref(), Some(&view), "one pass must read what the report reads: {text}");
                    read += 1;
                }
                Err(errors) => {
                    assert_eq!(fast, None, "one pass accepted what the report refuses ({errors:?}): {text}");
                    refused += 1;
                }
            }
        }
        assert!(read > 50 && refused > 200, "both outcomes exercised: {read} read, {refused} refused");
    }

    #[test]
    fn rejects_duplicate_known_fields() {
        let errs =
            problems(r#"{"event_type":"audit_operation","event_type":"x","entity_type":"Project","entity_id":6}"#);
        assert!(errs[0].problem.contains("duplicate field"), "{errs:?}");
    }

    #[test]
    fn rejects_unknown_and_unstreamed_types() {
        let errs = problems(r#"{"event_type":"no_such_type","entity_type":"Project","entity_id":6}"#);
        assert!(errs[0].problem.contains("not a registered event type"));
        let errs =
            problems(r#"{"event_type":"login_failed_with_otp_authentication","entity_type":"User","entity_id":6}"#);
        assert!(errs[0].problem.contains("streamed: false"));
        let accept = EventLimits { accept_unknown_types: true, ..EventLimits::default() };
        let body = r#"{"event_type":"no_such_type","entity_type":"Project","entity_id":6}"#;
        assert!(prepare(body.as_bytes(), &registry(), &accept, NOW).is_ok());
    }

    #[test]
    fn rejects_header_unsafe_type_and_id() {
        let accept = EventLimits { accept_unknown_types: true, ..EventLimits::default() };
        let body = r#"{"event_type":"x\r\nInjected: 1","entity_type":"Project","entity_id":6}"#;
        let errs = prepare(body.as_bytes(), &registry(), &accept, NOW).unwrap_err();
        assert_eq!(errs[0].field, "event_type");
        let errs = problems(r#"{"id":"a b","event_type":"audit_operation","entity_type":"Project","entity_id":6}"#);
        assert_eq!(errs[0].field, "id");
    }

    #[test]
    fn rejects_oversized_events() {
        let limits = EventLimits { max_event_bytes: 10, ..EventLimits::default() };
        let errs = prepare(minimal().as_bytes(), &registry(), &limits, NOW).unwrap_err();
        assert!(errs[0].problem.contains("more than the limit of 10 bytes"));
    }

    #[test]
    fn rejects_deep_nesting_without_crashing() {
        let deep = format!(
            r#"{{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"details":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let errs = problems(&deep);
        assert!(errs[0].problem.contains("deeper than 64"), "{errs:?}");
        let ok = format!(
            r#"{{"event_type":"audit_operation","entity_type":"Project","entity_id":6,"details":{{"a":{}"[{{\"}}]"{}}}}}"#,
            "[".repeat(60),
            "]".repeat(60)
        );
        assert!(
            prepare(ok.as_bytes(), &registry(), &EventLimits::default(), NOW).is_ok(),
            "brackets in strings do not count"
        );
    }

    #[test]
    fn partition_key_is_the_entity_and_its_buffer_is_replaced() {
        assert_eq!(partition_key("Project", 6), "Project:6");
        let mut key = String::from("left over from the last event");
        write_partition_key(&mut key, "Group", i64::MIN);
        assert_eq!(key, "Group:-9223372036854775808");
    }

    #[test]
    fn timestamp_format_has_milliseconds_and_z() {
        assert_eq!(format_timestamp(NOW), "2026-11-21T10:00:00.123Z");
        assert_eq!(timestamp_ms("2026-11-21T10:00:00.123Z"), Some(1_795_255_200_123));
        assert_eq!(timestamp_ms("yesterday"), None);
    }
}
