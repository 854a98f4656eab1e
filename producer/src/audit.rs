//! Instrumentation in the spirit of GitLab's auditor: describe what
//! happened as an [`AuditContext`] and publish it, or record several during
//! one operation and publish them together when it completes.
//!
//! ```no_run
//! # async fn demo(publisher: producer::Publisher) -> Result<(), producer::PublishError> {
//! use producer::audit::{AuditContext, Author, Scope, Target};
//! use proto::types::MERGE_REQUEST_CREATE; // a misspelt type does not compile
//!
//! let ctx = AuditContext::new(
//!     MERGE_REQUEST_CREATE,
//!     Author::user(1, "Administrator"),
//!     Scope::project(24, "example-group/example-project"),
//!     "Added merge request",
//! )
//! .target(Target::new(132, "MergeRequest", "Update test.md"))
//! .ip_address("127.0.0.1");
//! let id = publisher.audit(&ctx).await?; // resolves once the broker acknowledged it
//!
//! // Scoped: every event raised during the operation is published together
//! // when it completes (also when it fails: the attempt is audited too).
//! let (result, published) = publisher
//!     .audited(|recorder| async move {
//!         recorder.record(ctx.clone());
//!         recorder.record(ctx);
//!         "done"
//!     })
//!     .await;
//! # let _ = (id, result, published?); Ok(()) }
//! ```

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use futures_util::future::join_all;
use proto::{EventId, EventTypeName, FieldError};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::{PublishError, Publisher};

/// Who triggered the event.
#[derive(Debug, Clone, PartialEq)]
pub struct Author {
    /// User id; negative for non-user actors (-2 deploy token, -3 deploy key).
    pub id: i64,
    /// Human-readable name.
    pub name: String,
    /// `User`, `DeployToken`, `DeployKey`, …
    pub class: String,
}

impl Author {
    /// A user.
    pub fn user(id: i64, name: impl Into<String>) -> Self {
        Self { id, name: name.into(), class: "User".into() }
    }

    /// Any actor, with its class.
    pub fn new(id: i64, name: impl Into<String>, class: impl Into<String>) -> Self {
        Self { id, name: name.into(), class: class.into() }
    }
}

/// The entity the event belongs to (its scope).
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// `Project`, `Group`, `User`, `Instance`, …
    pub entity_type: String,
    /// Its id.
    pub id: i64,
    /// Its full path, when it has one.
    pub path: Option<String>,
}

impl Scope {
    /// A project.
    pub fn project(id: i64, path: impl Into<String>) -> Self {
        Self { entity_type: "Project".into(), id, path: Some(path.into()) }
    }
    /// A group.
    pub fn group(id: i64, path: impl Into<String>) -> Self {
        Self { entity_type: "Group".into(), id, path: Some(path.into()) }
    }
    /// A user.
    pub fn user(id: i64, username: impl Into<String>) -> Self {
        Self { entity_type: "User".into(), id, path: Some(username.into()) }
    }
    /// The whole instance.
    pub fn instance() -> Self {
        Self { entity_type: "Instance".into(), id: 1, path: None }
    }
}

/// The object acted upon.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Its id: an integer or a string.
    pub id: Value,
    /// Its type, e.g. `MergeRequest`.
    pub target_type: String,
    /// Details, e.g. a title.
    pub details: String,
}

impl Target {
    /// A target.
    pub fn new(id: impl Into<Value>, target_type: impl Into<String>, details: impl Into<String>) -> Self {
        Self { id: id.into(), target_type: target_type.into(), details: details.into() }
    }
}

/// One thing that happened, described well enough to become a SPEC §1
/// event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditContext {
    /// The event type.
    pub name: EventTypeName,
    /// Who did it.
    pub author: Author,
    /// Where it happened.
    pub scope: Scope,
    /// What it was done to.
    pub target: Option<Target>,
    /// What happened: text, or an object of structured facts.
    pub message: Value,
    /// From where.
    pub ip_address: Option<String>,
    /// When (default: when it is published).
    pub created_at: Option<OffsetDateTime>,
    /// Extra `details` entries.
    pub details: Map<String, Value>,
}

impl AuditContext {
    /// A context with the required parts.
    pub fn new(name: EventTypeName, author: Author, scope: Scope, message: impl Into<Value>) -> Self {
        Self {
            name,
            author,
            scope,
            target: None,
            message: message.into(),
            ip_address: None,
            created_at: None,
            details: Map::new(),
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// Sets the IP address.
    pub fn ip_address(mut self, ip: impl Into<String>) -> Self {
        self.ip_address = Some(ip.into());
        self
    }

    /// Sets when it happened.
    pub fn created_at(mut self, at: OffsetDateTime) -> Self {
        self.created_at = Some(at);
        self
    }

    /// Adds a `details` entry.
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// The event as GitLab streams it (SPEC §1); `id` is minted when it is
    /// published.
    pub fn to_event(&self) -> Vec<u8> {
        let (target_id, target_type, target_details) = match &self.target {
            Some(t) => (t.id.clone(), Value::from(t.target_type.clone()), Value::from(t.details.clone())),
            None => (Value::Null, Value::Null, Value::Null),
        };
        let mut details = Map::new();
        details.insert("author_name".into(), self.author.name.clone().into());
        details.insert("author_class".into(), self.author.class.clone().into());
        details.insert("target_id".into(), target_id.clone());
        details.insert("target_type".into(), target_type.clone());
        details.insert("target_details".into(), target_details.clone());
        details.insert("custom_message".into(), self.message.clone());
        details.insert("ip_address".into(), self.ip_address.clone().map_or(Value::Null, Value::from));
        details.insert("entity_path".into(), self.scope.path.clone().map_or(Value::Null, Value::from));
        details.insert("event_name".into(), self.name.as_str().into());
        details.extend(self.details.clone());
        let mut event = json!({
            "author_id": self.author.id,
            "author_name": self.author.name,
            "entity_id": self.scope.id,
            "entity_type": self.scope.entity_type,
            "entity_path": self.scope.path,
            "target_id": target_id,
            "target_type": target_type,
            "target_details": target_details,
            "event_type": self.name.as_str(),
            "ip_address": self.ip_address.clone().unwrap_or_default(),
            "details": details,
        });
        if let (Some(at), Value::Object(o)) = (self.created_at, &mut event) {
            o.insert("created_at".into(), proto::event::format_timestamp(at).into());
        }
        // Serializing a JSON value cannot fail.
        serde_json::to_vec(&event).unwrap_or_default()
    }
}

/// Collects the events raised during one operation. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<AuditContext>>>,
}

impl Recorder {
    /// Records an event, to be published when the operation completes.
    pub fn record(&self, ctx: AuditContext) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(ctx);
    }

    fn take(&self) -> Vec<AuditContext> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Publisher {
    /// Publishes one audit context; resolves once the broker acknowledged.
    pub async fn audit(&self, ctx: &AuditContext) -> Result<EventId, PublishError> {
        self.publish(&ctx.to_event()).await
    }

    /// Runs `op` with a [`Recorder`] and, when it completes (whatever its
    /// result), publishes everything recorded together: all are validated
    /// first, so an invalid one stops the batch before any is written.
    pub async fn audited<T, Fut>(&self, op: impl FnOnce(Recorder) -> Fut) -> (T, Result<Vec<EventId>, PublishError>)
    where
        Fut: Future<Output = T>,
    {
        let recorder = Recorder::default();
        let result = op(recorder.clone()).await;
        let events = recorder.take();
        (result, self.publish_contexts(&events).await)
    }

    async fn publish_contexts(&self, contexts: &[AuditContext]) -> Result<Vec<EventId>, PublishError> {
        let mut prepared = Vec::with_capacity(contexts.len());
        let mut errors: Vec<FieldError> = Vec::new();
        for (i, ctx) in contexts.iter().enumerate() {
            match self.prepare(&ctx.to_event()) {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    errors.extend(e.into_iter().map(|f| FieldError::new(format!("[{i}].{}", f.field), f.problem)))
                }
            }
        }
        if !errors.is_empty() {
            return Err(PublishError::Invalid(errors));
        }
        for r in join_all(prepared.iter().map(|p| self.send(p))).await {
            r?;
        }
        Ok(prepared.into_iter().map(|p| p.id).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::types::{AUDIT_OPERATION, MERGE_REQUEST_CREATE};

    fn ctx() -> AuditContext {
        AuditContext::new(
            MERGE_REQUEST_CREATE,
            Author::user(1, "Administrator"),
            Scope::project(24, "example-group/example-project"),
            "Added merge request",
        )
        .target(Target::new(132, "MergeRequest", "Update test.md"))
        .ip_address("127.0.0.1")
    }

    #[test]
    fn context_becomes_a_valid_gitlab_shaped_event() {
        let bytes = ctx().to_event();
        let registry = proto::Registry::embedded();
        let now = OffsetDateTime::now_utc();
        let p = proto::event::prepare(&bytes, &registry, &Default::default(), now).expect("valid event");
        let v: Value = serde_json::from_slice(&p.bytes).unwrap();
        for f in proto::event::FIELDS {
            assert!(v.get(f).is_some(), "{f}");
        }
        assert_eq!(v["event_type"], "merge_request_create");
        assert_eq!(v["entity_type"], "Project");
        assert_eq!(v["target_id"], 132);
        assert_eq!(v["details"]["custom_message"], "Added merge request");
        assert_eq!(v["details"]["author_class"], "User");
        assert_eq!(v["details"]["entity_path"], "example-group/example-project");
    }

    #[test]
    fn structured_messages_and_instance_scope() {
        let c = AuditContext::new(
            AUDIT_OPERATION,
            Author::new(-3, "deploy-key", "DeployKey"),
            Scope::instance(),
            json!({"protocol": "ssh"}),
        )
        .detail("extra", 5)
        .created_at(time::macros::datetime!(2022-02-23 06:21:05.283 UTC));
        let v: Value = serde_json::from_slice(&c.to_event()).unwrap();
        assert_eq!(v["details"]["custom_message"]["protocol"], "ssh");
        assert_eq!(v["details"]["extra"], 5);
        assert_eq!(v["author_id"], -3);
        assert_eq!(v["created_at"], "2022-02-23T06:21:05.283Z");
        assert_eq!(v["entity_path"], Value::Null);
    }

    #[test]
    fn recorder_collects_across_clones() {
        let r = Recorder::default();
        let r2 = r.clone();
        r.record(ctx());
        r2.record(ctx());
        assert_eq!(r.take().len(), 2);
        assert!(r2.take().is_empty());
    }
}
