//! What every black-box test file shares: the harness, pointed at the
//! binary cargo built for this test run.
#![allow(dead_code, unused_imports)]

pub use testkit::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_sandbox-manager");

pub fn production() -> ServerOptions {
    ServerOptions::production(BIN)
}

pub fn embedded() -> ServerOptions {
    ServerOptions::embedded(BIN)
}
