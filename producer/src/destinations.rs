//! The owners' API for destinations (SPEC §5), served by the producer.
//!
//! - Group destinations live under `/api/v1/groups/{group_id}/destinations`
//!   and are managed by that top-level group's owners (or instance admins);
//!   instance destinations under `/api/v1/instance/destinations`, by
//!   instance admins. A token that may not see a group's destinations gets
//!   404, so their existence does not leak.
//! - Every rule is checked before anything is written; a refusal is a 422
//!   listing each field and its problem.
//! - Every create, update and delete is written together with its audit
//!   event, one record in `audit.destinations` ([`crate::relay`] publishes
//!   the event): the event names what changed, never a secret value.
//! - The verification token is shown to those who may manage the
//!   destination; signing secrets and header values only in the answer to
//!   the request that set them, masked afterwards.
//!
//! Consistency: the producer reads destinations and the namespace tree from
//! their compacted topics and applies its own writes at once, so a replica
//! sees its own changes immediately and other replicas' within moments.
//! Uniqueness of names and the per-group limit are checked against that
//! view; two replicas taking conflicting changes in the same instant could
//! both succeed.

use std::net::IpAddr;

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use proto::{
    FieldError,
    destination::{
        Category, CustomHeader, Destination, DestinationName, DestinationUrl, Directory, EventTypeFilter, HeaderName,
        HeaderValue, Owner, RetiringSecret, SigningSecret, VerificationToken,
    },
    namespace::NamespaceRef,
    netguard::Policy,
    tree::Tree,
    types,
};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use service::table::Table;

use crate::{
    api::{ApiError, AppState, error, read_body},
    audit::{AuditContext, Author, Scope, Target},
    auth::Principal,
};

/// What the API reads destinations and the tree from.
#[derive(Clone)]
pub struct Store {
    /// Destinations, from `audit.destinations`.
    pub destinations: Table<Directory>,
    /// The namespace tree, from `audit.namespaces`.
    pub tree: Table<Tree>,
}

/// The destination routes (state added by [`crate::api::router`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/groups/{group_id}/destinations", get(list_group).post(create_group))
        .route("/api/v1/groups/{group_id}/destinations/{id}", get(get_group).patch(update_group).delete(delete_group))
        .route("/api/v1/instance/destinations", get(list_instance).post(create_instance))
        .route("/api/v1/instance/destinations/{id}", get(get_instance).patch(update_instance).delete(delete_instance))
}

fn not_found() -> ApiError {
    error(StatusCode::NOT_FOUND, "not_found", "no such destination", Value::Null)
}

fn group_owner(group_id: &str) -> Result<Owner, ApiError> {
    group_id.parse::<i64>().ok().filter(|g| *g > 0).map(|id| Owner::Group { id }).ok_or_else(not_found)
}

/// Who may do what: group destinations are invisible (404) to tokens that
/// do not manage the group; instance destinations need an instance admin.
fn access(state: &AppState, headers: &HeaderMap, owner: Owner) -> Result<Principal, ApiError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = state.auth.principal(value)?;
    match owner {
        Owner::Group { id } if principal.manages_group(id) => Ok(principal),
        Owner::Group { .. } => Err(not_found()),
        Owner::Instance if principal.is_admin() => Ok(principal),
        Owner::Instance => Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "instance destinations are managed by instance admins",
            Value::Null,
        )),
    }
}

fn mask(_: &str) -> &'static str {
    "********"
}

/// The JSON view of a destination. `reveal` shows signing secrets and
/// header values (only in the answer that set them).
fn view(d: &Destination, reveal: bool) -> Value {
    let owner = match d.owner {
        Owner::Instance => json!({ "kind": "instance" }),
        Owner::Group { id } => json!({ "kind": "group", "id": id }),
    };
    let secret = |s: &SigningSecret| if reveal { s.expose().to_owned() } else { format!("whsec_{}", mask(s.expose())) };
    json!({
        "id": d.id,
        "owner": owner,
        "name": d.name.expose(),
        "category": d.category,
        "url": d.url.expose(),
        "verification_token": d.verification_token.expose(),
        "signing_secret": d.signing_secret.as_ref().map(secret),
        "previous_signing_secret_until": d.previous_signing_secret.as_ref().map(|r| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.until_ms) * 1_000_000)
                .map(proto::event::format_timestamp)
                .unwrap_or_default()
        }),
        "headers": d.headers.iter().map(|h| json!({
            "name": h.name.expose(),
            "value": if reveal { h.value.expose() } else { mask(h.value.expose()) },
            "active": h.active,
        })).collect::<Vec<_>>(),
        "event_type_filters": d.event_type_filters,
        "namespace_filters": d.namespace_filters,
        "active": d.active,
    })
}

/// `Some(None)` for an explicit `null`, `None` when absent.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderInput {
    name: String,
    value: String,
    #[serde(default)]
    active: Option<bool>,
}

/// A create or update request; absent fields are left as they are.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    verification_token: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    signing_secret: Option<Option<String>>,
    #[serde(default)]
    headers: Option<Vec<HeaderInput>>,
    #[serde(default)]
    event_type_filters: Option<EventTypeFilter>,
    #[serde(default)]
    namespace_filters: Option<Vec<NamespaceRef>>,
    #[serde(default)]
    active: Option<bool>,
}

fn invalid(errors: Vec<FieldError>) -> ApiError {
    error(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_destination",
        format!("{} problems with the destination", errors.len()),
        json!({ "errors": errors }),
    )
}

async fn parse_input(state: &AppState, body: Body) -> Result<Input, ApiError> {
    let bytes = read_body(state, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(vec![FieldError::new("(body)", e.to_string())]))
}

fn generate_token() -> String {
    use rand::{Rng, distr::Alphanumeric};
    rand::rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect()
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Builds the destination a request asks for from `base` (the current one
/// on update), collecting every field problem.
fn apply(
    state: &AppState,
    input: Input,
    base: Option<&Destination>,
    owner: Owner,
    errors: &mut Vec<FieldError>,
) -> Option<(Destination, Vec<&'static str>)> {
    let mut changed = Vec::new();
    let mut field = |name: &'static str, r: Result<(), String>| {
        if let Err(problem) = r {
            errors.push(FieldError::new(name, problem));
        }
    };
    let name = match (&input.name, base) {
        (Some(n), _) => DestinationName::new(n.trim()).map_err(|e| field("name", Err(e))).ok(),
        (None, Some(b)) => Some(b.name.clone()),
        (None, None) => {
            field("name", Err("is required".into()));
            None
        }
    };
    if input.name.is_some() {
        changed.push("name");
    }
    let category = match input.category.as_deref() {
        None | Some("http") => Some(Category::Http),
        Some(other @ ("amazon_s3" | "gcp_logging" | "splunk_hec")) => {
            field("category", Err(format!("{other:?} is not supported yet; use \"http\"")));
            None
        }
        Some(other) => {
            field("category", Err(format!("{other:?} is not a category (http)")));
            None
        }
    };
    let url = match (&input.url, base) {
        (Some(u), _) => DestinationUrl::new(u.as_str()).map_err(|e| field("url", Err(e))).ok(),
        (None, Some(b)) => Some(b.url.clone()),
        (None, None) => {
            field("url", Err("is required".into()));
            None
        }
    };
    if input.url.is_some() {
        changed.push("url");
    }
    let token = match (&input.verification_token, base) {
        (Some(_), Some(_)) => {
            field("verification_token", Err("cannot be changed after creation; create a new destination".into()));
            None
        }
        (Some(t), None) => VerificationToken::new(t.as_str()).map_err(|e| field("verification_token", Err(e))).ok(),
        (None, Some(b)) => Some(b.verification_token.clone()),
        (None, None) => VerificationToken::new(generate_token()).ok(),
    };
    let (mut signing_secret, mut previous) =
        base.map_or((None, None), |b| (b.signing_secret.clone(), b.previous_signing_secret.clone()));
    match &input.signing_secret {
        None => {}
        Some(None) => {
            (signing_secret, previous) = (None, None);
            changed.push("signing_secret");
        }
        Some(Some(s)) => match SigningSecret::new(s.as_str()) {
            Ok(new) => {
                // Rotation: the old secret keeps signing beside the new one.
                let grace = state.config.signing_secret_rotation_grace.as_millis() as i64;
                previous = signing_secret
                    .take()
                    .filter(|old| *old != new)
                    .map(|secret| RetiringSecret { secret, until_ms: now_ms() + grace });
                signing_secret = Some(new);
                changed.push("signing_secret");
            }
            Err(e) => field("signing_secret", Err(e)),
        },
    }
    let headers = match input.headers {
        Some(list) => {
            changed.push("headers");
            let mut out = Vec::with_capacity(list.len());
            for (i, h) in list.into_iter().enumerate() {
                let name =
                    HeaderName::new(h.name).map_err(|e| errors.push(FieldError::new(format!("headers[{i}].name"), e)));
                let value = HeaderValue::new(h.value)
                    .map_err(|e| errors.push(FieldError::new(format!("headers[{i}].value"), e)));
                if let (Ok(name), Ok(value)) = (name, value) {
                    out.push(CustomHeader { name, value, active: h.active.unwrap_or(true) });
                }
            }
            out
        }
        None => base.map(|b| b.headers.clone()).unwrap_or_default(),
    };
    let mut field = |name: &'static str, present: bool| {
        if present {
            changed.push(name);
        }
    };
    field("event_type_filters", input.event_type_filters.is_some());
    field("namespace_filters", input.namespace_filters.is_some());
    field("active", input.active.is_some());
    let destination = Destination {
        id: base.map_or_else(|| uuid::Uuid::new_v4().to_string(), |b| b.id.clone()),
        owner,
        name: name?,
        category: category?,
        url: url?,
        verification_token: token?,
        signing_secret,
        previous_signing_secret: previous,
        headers,
        event_type_filters: input
            .event_type_filters
            .or_else(|| base.map(|b| b.event_type_filters.clone()))
            .unwrap_or_default(),
        namespace_filters: input
            .namespace_filters
            .or_else(|| base.map(|b| b.namespace_filters.clone()))
            .unwrap_or_default(),
        active: input.active.or(base.map(|b| b.active)).unwrap_or(true),
    };
    Some((destination, changed))
}

/// The rules that need the tables: top-level owner group, namespace filters
/// that exist and lie under it, a unique name, the active limit.
fn check_against_tables(state: &AppState, d: &Destination, errors: &mut Vec<FieldError>) {
    if let Err(e) = d.validate(state.publisher.registry()) {
        errors.extend(e);
    }
    let tree = state.destinations.tree.read();
    if let Owner::Group { id } = d.owner {
        match tree.get(NamespaceRef::group(id)) {
            None => errors.push(FieldError::new(
                "group_id",
                format!("group {id} is not in the namespace tree (publish it first)"),
            )),
            Some(r) if r.parent.is_some() => errors.push(FieldError::new(
                "group_id",
                format!("group {id} is a subgroup; destinations belong to top-level groups"),
            )),
            Some(_) => {}
        }
    }
    for (i, f) in d.namespace_filters.iter().enumerate() {
        let name = format!("namespace_filters[{i}]");
        if tree.get(*f).is_none() {
            errors.push(FieldError::new(name, format!("{f} is not in the namespace tree")));
        } else if let Owner::Group { id } = d.owner
            && !tree.is_under(*f, NamespaceRef::group(id))
        {
            errors.push(FieldError::new(name, format!("{f} is not in group {id}")));
        }
    }
    drop(tree);
    let table = state.destinations.destinations.read();
    let siblings: Vec<_> = match d.owner {
        Owner::Instance => table.instance().iter().filter(|o| o.id != d.id).cloned().collect(),
        Owner::Group { id } => table.group(id).iter().filter(|o| o.id != d.id).cloned().collect(),
    };
    drop(table);
    if let Some(same) = siblings.iter().find(|o| o.name.expose().eq_ignore_ascii_case(d.name.expose())) {
        errors.push(FieldError::new("name", format!("is already used by destination {}", same.id)));
    }
    let limit = state.config.max_active_destinations_per_group;
    if let Owner::Group { id } = d.owner
        && d.active
        && siblings.iter().filter(|o| o.active).count() >= limit
    {
        errors.push(FieldError::new("active", format!("group {id} already has {limit} active destinations")));
    }
}

/// How long a destination's host name may take to resolve when it is
/// checked. Without a bound, a slow DNS server holds the create or update
/// until the system resolver gives up (glibc: 5 s a try, two tries).
const RESOLVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses URLs whose host is, or resolves to, a special-purpose address
/// (loopback, private, link-local, metadata, …) unless allow-listed. The
/// deliverer checks again at connect time, against DNS rebinding.
async fn check_url_safety(state: &AppState, url: &DestinationUrl, errors: &mut Vec<FieldError>) {
    let policy = Policy { allowed: state.config.allowed_networks.clone() };
    let lookup = |host: String, port| async move {
        tokio::net::lookup_host((host.as_str(), port)).await.map(|found| found.map(|a| a.ip()).collect())
    };
    if let Err(why) = url_safety(&policy, url.expose(), RESOLVE_WITHIN, lookup).await {
        errors.push(FieldError::new("url", why));
    }
}

/// [`check_url_safety`]'s rule, with the resolver given (`lookup`) and
/// bounded by `within`.
async fn url_safety<F, Fut>(policy: &Policy, url: &str, within: std::time::Duration, lookup: F) -> Result<(), String>
where
    F: FnOnce(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let Ok(parsed) = url::Url::parse(url) else { return Ok(()) };
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addresses: Vec<IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(a)) => vec![IpAddr::V4(a)],
        Some(url::Host::Ipv6(a)) => vec![IpAddr::V6(a)],
        Some(url::Host::Domain(host)) => match tokio::time::timeout(within, lookup(host.to_owned(), port)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return Err(format!("host {host:?} does not resolve: {e}")),
            Err(_) => return Err(format!("host {host:?} does not resolve within {} s", within.as_secs_f64())),
        },
        None => return Ok(()),
    };
    match addresses.iter().find_map(|ip| policy.check(*ip).err()) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// The event types of destination changes.
const CHANGE_TYPES: [proto::EventTypeName; 6] = [
    types::CREATE_GROUP_EVENT_STREAMING_DESTINATION,
    types::UPDATE_GROUP_EVENT_STREAMING_DESTINATION,
    types::DESTROY_GROUP_EVENT_STREAMING_DESTINATION,
    types::CREATE_INSTANCE_EVENT_STREAMING_DESTINATION,
    types::UPDATE_INSTANCE_EVENT_STREAMING_DESTINATION,
    types::DESTROY_INSTANCE_EVENT_STREAMING_DESTINATION,
];

/// Whether `event_type` is one of a destination change.
pub fn is_change_type(event_type: &str) -> bool {
    CHANGE_TYPES.iter().any(|t| t.as_str() == event_type)
}

/// Checks at start that every destination change can be audited: its event
/// type registered and streamed (an operator's definitions may replace the
/// shipped ones).
pub fn check_audit_types(registry: &proto::Registry) -> Result<(), String> {
    let refused: Vec<String> = CHANGE_TYPES
        .iter()
        .filter(|t| !registry.get(t.as_str()).is_some_and(|d| d.streamed))
        .map(|t| t.as_str().to_owned())
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(format!(
        "destination changes are audit events (SPEC §5), but these types are not registered with streamed: true: {}",
        refused.join(", ")
    ))
}

fn change_event(principal: &Principal, state: &AppState, d: &Destination, verb: &str, message: String) -> AuditContext {
    let name = match (d.owner, verb) {
        (Owner::Group { .. }, "create") => types::CREATE_GROUP_EVENT_STREAMING_DESTINATION,
        (Owner::Group { .. }, "update") => types::UPDATE_GROUP_EVENT_STREAMING_DESTINATION,
        (Owner::Group { .. }, _) => types::DESTROY_GROUP_EVENT_STREAMING_DESTINATION,
        (Owner::Instance, "create") => types::CREATE_INSTANCE_EVENT_STREAMING_DESTINATION,
        (Owner::Instance, "update") => types::UPDATE_INSTANCE_EVENT_STREAMING_DESTINATION,
        (Owner::Instance, _) => types::DESTROY_INSTANCE_EVENT_STREAMING_DESTINATION,
    };
    let author = match principal.user_id {
        Some(id) => Author::user(id, principal.name.clone()),
        None => Author::new(-1, principal.name.clone(), "ApiToken"),
    };
    let scope = match d.owner {
        Owner::Instance => Scope::instance(),
        Owner::Group { id } => {
            let path = state.destinations.tree.read().get(NamespaceRef::group(id)).map(|r| r.full_path.clone());
            Scope::group(id, path.unwrap_or_default())
        }
    };
    AuditContext::new(name, author, scope, message).target(Target::new(
        d.id.clone(),
        "EventStreamingDestination",
        d.name.expose(),
    ))
}

/// Writes the destination (or its tombstone) together with the change's
/// audit event, as one record ([`crate::relay`] publishes the event), and
/// applies it locally once Kafka acknowledged it.
async fn commit(state: &AppState, d: &Destination, deleted: bool, audit: AuditContext) -> Result<(), ApiError> {
    let event = state.publisher.prepare(&audit.to_event()).map_err(|errors| {
        // The event types are checked at start (check_audit_types);
        // a refusal here is a bug, and nothing is written.
        tracing::error!(errors = %FieldError::join(&errors), destination = %d.id, "the change's audit event is invalid");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the change's audit event could not be built; nothing changed",
            Value::Null,
        )
    })?;
    let destination = if deleted { None } else { Some(d) };
    state.publisher.change_destination(&d.id, destination, Some(&event)).await.map_err(|e| {
        tracing::warn!(error = %e, destination = %d.id, "destination write not acknowledged");
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Kafka did not acknowledge the change; nothing changed",
            Value::Null,
        )
    })?;
    state.destinations.destinations.update(|dir| if deleted { dir.remove(&d.id) } else { dir.upsert(d.clone()) });
    Ok(())
}

fn find(state: &AppState, owner: Owner, id: &str) -> Result<std::sync::Arc<Destination>, ApiError> {
    state.destinations.destinations.read().get(id).filter(|d| d.owner == owner).cloned().ok_or_else(not_found)
}

async fn list(state: AppState, headers: HeaderMap, owner: Owner) -> Result<Response, ApiError> {
    access(&state, &headers, owner)?;
    let table = state.destinations.destinations.read();
    let list = match owner {
        Owner::Instance => table.instance(),
        Owner::Group { id } => table.group(id),
    };
    let mut views: Vec<Value> = list.iter().map(|d| view(d, false)).collect();
    drop(table);
    views.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(Json(json!({ "destinations": views })).into_response())
}

async fn create(state: AppState, headers: HeaderMap, owner: Owner, body: Body) -> Result<Response, ApiError> {
    let principal = access(&state, &headers, owner)?;
    let input = parse_input(&state, body).await?;
    let mut errors = Vec::new();
    let built = apply(&state, input, None, owner, &mut errors);
    if let Some((d, _)) = &built {
        check_against_tables(&state, d, &mut errors);
        check_url_safety(&state, &d.url, &mut errors).await;
    }
    let Some((d, _)) = built.filter(|_| errors.is_empty()) else { return Err(invalid(errors)) };
    let message = format!("Created event streaming destination {:?} ({})", d.name.expose(), host_of(&d));
    commit(&state, &d, false, change_event(&principal, &state, &d, "create", message)).await?;
    let location = match owner {
        Owner::Instance => format!("/api/v1/instance/destinations/{}", d.id),
        Owner::Group { id } => format!("/api/v1/groups/{id}/destinations/{}", d.id),
    };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(view(&d, true))).into_response())
}

fn host_of(d: &Destination) -> String {
    url::Url::parse(d.url.expose()).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default()
}

async fn update(
    state: AppState,
    headers: HeaderMap,
    owner: Owner,
    id: String,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = access(&state, &headers, owner)?;
    let current = find(&state, owner, &id)?;
    let input = parse_input(&state, body).await?;
    let reveal = input.signing_secret.as_ref().is_some_and(Option::is_some) || input.headers.is_some();
    let mut errors = Vec::new();
    let built = apply(&state, input, Some(&current), owner, &mut errors);
    if let Some((d, changed)) = &built {
        check_against_tables(&state, d, &mut errors);
        if changed.contains(&"url") {
            check_url_safety(&state, &d.url, &mut errors).await;
        }
    }
    let Some((d, changed)) = built.filter(|_| errors.is_empty()) else { return Err(invalid(errors)) };
    let what = if changed.is_empty() { "nothing".to_owned() } else { changed.join(", ") };
    let message = format!("Updated event streaming destination {:?}: changed {what}", d.name.expose());
    commit(&state, &d, false, change_event(&principal, &state, &d, "update", message)).await?;
    Ok(Json(view(&d, reveal)).into_response())
}

async fn delete(state: AppState, headers: HeaderMap, owner: Owner, id: String) -> Result<Response, ApiError> {
    let principal = access(&state, &headers, owner)?;
    let current = find(&state, owner, &id)?;
    let message = format!("Deleted event streaming destination {:?} ({})", current.name.expose(), host_of(&current));
    commit(&state, &current, true, change_event(&principal, &state, &current, "destroy", message)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_group(State(s): State<AppState>, Path(g): Path<String>, h: HeaderMap) -> Result<Response, ApiError> {
    list(s, h, group_owner(&g)?).await
}
async fn create_group(
    State(s): State<AppState>,
    Path(g): Path<String>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    create(s, h, group_owner(&g)?, body).await
}
async fn get_group(
    State(s): State<AppState>,
    Path((g, id)): Path<(String, String)>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    let owner = group_owner(&g)?;
    access(&s, &h, owner)?;
    Ok(Json(view(&*find(&s, owner, &id)?, false)).into_response())
}
async fn update_group(
    State(s): State<AppState>,
    Path((g, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    update(s, h, group_owner(&g)?, id, body).await
}
async fn delete_group(
    State(s): State<AppState>,
    Path((g, id)): Path<(String, String)>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    delete(s, h, group_owner(&g)?, id).await
}
async fn list_instance(State(s): State<AppState>, h: HeaderMap) -> Result<Response, ApiError> {
    list(s, h, Owner::Instance).await
}
async fn create_instance(State(s): State<AppState>, h: HeaderMap, body: Body) -> Result<Response, ApiError> {
    create(s, h, Owner::Instance, body).await
}
async fn get_instance(State(s): State<AppState>, Path(id): Path<String>, h: HeaderMap) -> Result<Response, ApiError> {
    access(&s, &h, Owner::Instance)?;
    Ok(Json(view(&*find(&s, Owner::Instance, &id)?, false)).into_response())
}
async fn update_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    update(s, h, Owner::Instance, id, body).await
}
async fn delete_instance(
    State(s): State<AppState>,
    Path(id): Path<String>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    delete(s, h, Owner::Instance, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_definitions_audit_every_destination_change() {
        assert_eq!(check_audit_types(&proto::Registry::embedded()), Ok(()));
        let e = check_audit_types(&proto::Registry::default()).unwrap_err();
        for t in CHANGE_TYPES {
            assert!(e.contains(t.as_str()), "{e}");
        }
    }

    /// A DNS server that never answers cannot be put behind the system
    /// resolver in a test, so this one is a resolver that never answers.
    #[tokio::test]
    async fn a_host_name_that_does_not_resolve_in_time_is_refused() {
        let policy = Policy { allowed: Vec::new() };
        let within = std::time::Duration::from_millis(20);
        let silent = |_: String, _: u16| std::future::pending::<std::io::Result<Vec<IpAddr>>>();
        let check = url_safety(&policy, "https://siem.example.com/in", within, silent);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(30), check)
            .await
            .expect("the check waited on the resolver without a bound");
        assert_eq!(outcome, Err("host \"siem.example.com\" does not resolve within 0.02 s".to_owned()));

        // The same resolver answering in time: its addresses are checked.
        let public = |_: String, port: u16| async move {
            assert_eq!(port, 443, "the scheme's port is looked up");
            Ok(vec!["93.184.216.34".parse().unwrap()])
        };
        assert_eq!(url_safety(&policy, "https://siem.example.com/in", within, public).await, Ok(()));
        let private =
            |_: String, _: u16| async { Ok(vec!["93.184.216.34".parse().unwrap(), "10.1.2.3".parse().unwrap()]) };
        let refused = url_safety(&policy, "https://siem.example.com/in", within, private).await.unwrap_err();
        assert!(refused.contains("10.1.2.3"), "{refused}");
    }
}
