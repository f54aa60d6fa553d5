//! What every black-box suite shares: the harness, pointed at the binary
//! cargo built for this test run, and the gate that keeps the suites of
//! this one binary out of each other's way.
#![allow(dead_code, unused_imports)]

pub use testkit::*;

use std::sync::{Mutex, PoisonError};

pub const BIN: &str = env!("CARGO_BIN_EXE_sandbox-manager");

pub fn production() -> ServerOptions {
    ServerOptions::production(BIN)
}

pub fn embedded() -> ServerOptions {
    ServerOptions::embedded(BIN)
}

/// Who is inside the gate: the tests of one suite, or one test alone.
struct Gate {
    suite: &'static str,
    alone: bool,
    inside: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    suite: "",
    alone: false,
    inside: 0,
});
static GATE_OPENED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Held for a test's whole run (see [`suite`] and [`alone`]).
#[must_use = "the gate is held until this is dropped"]
pub struct Inside;

impl Drop for Inside {
    fn drop(&mut self) {
        GATE.lock().unwrap_or_else(PoisonError::into_inner).inside -= 1;
        GATE_OPENED.notify_waiters();
    }
}

async fn enter(suite: &'static str, alone: bool) -> Inside {
    loop {
        let opened = GATE_OPENED.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        {
            let mut gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
            let joins = !alone && !gate.alone && gate.suite == suite;
            if gate.inside == 0 || joins {
                gate.suite = suite;
                gate.alone = alone;
                gate.inside += 1;
                return Inside;
            }
        }
        opened.await;
    }
}

/// Waits until no test of another suite runs, then lets the test run
/// beside the rest of its own suite (`module_path!()`): the suites load the
/// machine and time what must stay responsive, as they did when each was a
/// test binary of its own.
pub async fn suite(module: &'static str) -> Inside {
    enter(module, false).await
}

/// Waits until no other test runs and keeps them out until dropped: for a
/// test that loads the machine on purpose (a fork bomb, a full disk) and
/// times what must stay responsive, which should measure the sandbox, not
/// its neighbours.
pub async fn alone() -> Inside {
    enter("", true).await
}
