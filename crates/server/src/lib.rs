//! sandbox-manager's control plane: configuration, HTTP API, auth.

pub mod app;
pub mod archive;
pub mod attachments;
pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod json;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod quotas;
pub mod reconcile;
pub mod routes;
pub mod serve;
pub mod telemetry;
pub mod timefmt;
pub mod views;
