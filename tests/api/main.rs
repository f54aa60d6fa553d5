//! The black-box API tests: one test binary running the real
//! `sandbox-manager` (found through `CARGO_BIN_EXE_*`) against Postgres and
//! Garage, or the embedded default. Each module is one suite; filter by its
//! name, e.g. `cargo test -p sandbox-manager --test api sandboxes::`.
//!
//! The sandbox suites (sandboxes, hydration, layers, microvm, escape) run on
//! the runtime `SANDBOX_TEST_RUNTIME` names (namespace by default);
//! scripts/test.sh runs them again with microvm.

mod common;

mod abuse;
mod embedded_default;
mod escape;
mod faults;
mod hydration;
mod layers;
mod microvm;
mod pause;
mod pty;
mod sandboxes;
mod snapshots;
mod templates;
mod volumes;
mod writeback;
