//! The contracts of auditstream: pure data and validation, no I/O runtime.
//!
//! # Layout
//! - [`event`] — the audit event (SPEC §1), validated and completed without
//!   changing the bytes a publisher sent.
//! - [`event_type`] — event-type definitions and their registry (SPEC §3).
//! - [`namespace`] — the namespace tree records (SPEC §4).
//! - [`destination`] — destination configuration and its rules (SPEC §5).
//! - [`delivery`] — the delivery envelope: the record key, and headers once
//!   a delivery was attempted (a fresh one is read from its event).
//! - [`seal`] — secrets at rest (AES-256-GCM under operator keys).
//! - [`signature`] — Standard Webhooks v1 signing and verification.
//! - [`netguard`] — which addresses destinations may reach.
//! - [`topics`] — topic names.
//! - [`tree`] — the namespace tree and root-ancestor resolution.

pub mod delivery;
pub mod destination;
pub mod event;
pub mod event_type;
pub mod namespace;
pub mod netguard;
pub mod seal;
pub mod signature;
pub mod topics;
pub mod tree;
pub mod types;

pub use event::{EventId, EventLimits, EventView, FieldError, PreparedEvent};
pub use event_type::{EventTypeDefinition, EventTypeName, Registry};
