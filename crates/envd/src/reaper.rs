//! Reaping of orphaned zombies when envd is PID 1 of a pid namespace.
//!
//! Children envd spawned are reaped by tokio (their exit status matters), so
//! the reaper must never `waitpid(-1)`: it peeks at the next zombie with
//! `waitid(WNOWAIT)` and reaps it only when it is not one of ours. Spawning
//! holds the same lock until the new pid is registered, so a fast-exiting
//! child can never be mistaken for an orphan.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Default)]
pub struct Reaper {
    owned: Mutex<HashSet<u32>>,
}

impl Reaper {
    /// Hold while spawning a child, then [`OwnedChildren::register`] it.
    pub fn lock(&self) -> OwnedChildren<'_> {
        OwnedChildren(
            self.owned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Call after tokio has reaped `pid`.
    pub fn forget(&self, pid: u32) {
        self.lock().0.remove(&pid);
    }

    /// Starts the reaping task if this process is PID 1 (only PID 1, or a
    /// subreaper, inherits orphans).
    pub fn start_if_init(self: &Arc<Self>) {
        if std::process::id() != 1 {
            return;
        }
        tracing::info!("running as PID 1: reaping orphaned processes");
        let reaper = self.clone();
        tokio::spawn(async move {
            let mut sigchld =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
                    Ok(signal) => Some(signal),
                    Err(error) => {
                        tracing::warn!(%error, "cannot watch SIGCHLD; reaping periodically only");
                        None
                    }
                };
            loop {
                match sigchld.as_mut() {
                    Some(signal) => {
                        let _ = tokio::time::timeout(Duration::from_secs(5), signal.recv()).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(1)).await,
                }
                reaper.reap_orphans();
            }
        });
    }

    fn reap_orphans(&self) {
        loop {
            let owned = self.lock();
            // SAFETY: zeroed siginfo is a valid out-parameter.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            let result = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
            let pid = unsafe { info.si_pid() };
            if result != 0 || pid <= 0 {
                return;
            }
            if owned.0.contains(&(pid as u32)) {
                // Ours: tokio will collect it, and it hides any zombie behind
                // it until then; the next SIGCHLD or tick retries.
                return;
            }
            let mut status = 0;
            // SAFETY: reaps exactly this orphan.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            tracing::debug!(pid, "reaped orphan");
        }
    }
}

pub struct OwnedChildren<'a>(MutexGuard<'a, HashSet<u32>>);

impl OwnedChildren<'_> {
    pub fn register(&mut self, pid: u32) {
        self.0.insert(pid);
    }
}
