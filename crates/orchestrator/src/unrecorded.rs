//! Machines this process holds that have no running sandbox row: booting,
//! idle in the warm pool, mid-create, or being destroyed. The orphan sweep
//! destroys every machine the runtime lists that is neither here nor in a
//! running row, so a machine whose create panicked, was abandoned or lost
//! its row is gone within one sweep, not only at the next restart.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Held ids with how many holds each has (a create and a destroy may hold
/// the same id at once; it stays held until both let go).
type Holds = Arc<Mutex<HashMap<String, usize>>>;

#[derive(Clone, Default)]
pub struct Unrecorded {
    ids: Holds,
}

impl Unrecorded {
    /// Marks `id` as held until the guard drops (also on panic unwinding).
    pub fn hold(&self, id: &str) -> UnrecordedGuard {
        *self.ids.lock().unwrap().entry(id.to_string()).or_default() += 1;
        UnrecordedGuard {
            ids: self.ids.clone(),
            id: id.to_string(),
        }
    }

    pub fn snapshot(&self) -> HashSet<String> {
        self.ids.lock().unwrap().keys().cloned().collect()
    }
}

/// Holds one id in [`Unrecorded`]; dropping it releases the machine to the
/// sweep (which destroys it unless a running row names it by then).
#[derive(Debug)]
pub struct UnrecordedGuard {
    ids: Holds,
    id: String,
}

impl Drop for UnrecordedGuard {
    fn drop(&mut self) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = ids.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                ids.remove(&self.id);
            }
        }
    }
}

impl std::fmt::Debug for Unrecorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.snapshot()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guard_holds_its_id_until_dropped_even_by_a_panic() {
        let unrecorded = Unrecorded::default();
        let guard = unrecorded.hold("sbx-1");
        assert!(unrecorded.snapshot().contains("sbx-1"));
        let second = unrecorded.hold("sbx-1");
        drop(guard);
        assert!(unrecorded.snapshot().contains("sbx-1"), "still held once");
        drop(second);
        assert!(unrecorded.snapshot().is_empty());

        let held = unrecorded.clone();
        let result = std::panic::catch_unwind(move || {
            let _guard = held.hold("sbx-2");
            panic!("create failed half-way");
        });
        assert!(result.is_err());
        assert!(unrecorded.snapshot().is_empty());
    }
}
