//! Wire protocol of `envd`, the agent that runs inside every sandbox.
//!
//! This crate is shared by the agent (server side) and the orchestrator
//! (client side). It holds:
//! - [`PROTOCOL_VERSION`] and the compatibility rule ([`is_compatible`]),
//! - the request/response types ([`types`]), frozen per protocol version by
//!   `tests/protocol_freeze.rs`,
//! - the route table ([`routes`]),
//! - the async client ([`client::EnvdClient`]).

pub mod client;
pub mod mux;
pub mod query;
pub mod routes;
pub mod types;

pub use types::*;

/// Version of the wire protocol spoken by this build.
///
/// Bump it only for a change an older peer cannot understand; additive,
/// optional fields do not need a bump (serde ignores unknown fields and fills
/// defaults for missing ones).
///
/// - 1: files, processes, env, init.
/// - 2: block volumes (`/volumes/block/*`), for VM agents.
/// - 3: directory archives (`/files/archive`), usage figures (`/usage`),
///   pseudo-terminals (`/pty`).
pub const PROTOCOL_VERSION: u32 = 3;

/// Header carrying the access token: `Authorization: Bearer TOKEN`.
pub const AUTHORIZATION_SCHEME: &str = "Bearer";

/// Oldest agent protocol version this client still knows how to drive.
pub const MIN_SUPPORTED_PROTOCOL_VERSION: u32 = 1;

/// Whether a client built from this crate can talk to an agent that reports
/// `agent_version` in `/health`.
pub fn is_compatible(agent_version: u32) -> bool {
    (MIN_SUPPORTED_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&agent_version)
}
