//! Typed constants for every event type shipped in `proto/event_types/`,
//! generated at build time, so a misspelt type does not compile.

use crate::event_type::EventTypeName;

include!(concat!(env!("OUT_DIR"), "/event_types.rs"));
