//! Warm pool: per template, a queue of booted sandboxes whose envd already
//! answers. A create pops one in O(1) and wakes the refiller; nothing in the
//! pool is ever handed out twice.

use crate::unrecorded::UnrecordedGuard;
use sandbox_runtime::Booted;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;

/// A booted sandbox without a row yet, the token its envd expects, and the
/// hold that keeps the orphan sweep off it until its row exists.
#[derive(Debug)]
pub struct WarmSandbox {
    pub booted: Booted,
    pub token: String,
    /// Never read: held for its drop.
    #[allow(dead_code)]
    pub held: UnrecordedGuard,
}

pub struct WarmPool {
    targets: BTreeMap<String, usize>,
    ready: Mutex<HashMap<String, VecDeque<WarmSandbox>>>,
    /// Wakes the refill loop after a claim.
    pub refill: Notify,
}

impl WarmPool {
    pub fn new(targets: BTreeMap<String, usize>) -> Self {
        WarmPool {
            targets,
            ready: Mutex::default(),
            refill: Notify::new(),
        }
    }

    pub fn templates(&self) -> impl Iterator<Item = (&String, &usize)> {
        self.targets.iter().filter(|(_, size)| **size > 0)
    }

    pub fn claim(&self, template: &str) -> Option<WarmSandbox> {
        let claimed = self
            .ready
            .lock()
            .unwrap()
            .get_mut(template)
            .and_then(VecDeque::pop_front);
        self.refill.notify_one();
        let outcome = if claimed.is_some() { "hit" } else { "miss" };
        metrics::counter!("pool_claims_total", "template" => template.to_string(), "result" => outcome)
            .increment(1);
        self.publish(template);
        claimed
    }

    pub fn add(&self, template: &str, sandbox: WarmSandbox) {
        self.ready
            .lock()
            .unwrap()
            .entry(template.to_string())
            .or_default()
            .push_back(sandbox);
        self.publish(template);
    }

    pub fn len(&self, template: &str) -> usize {
        self.ready
            .lock()
            .unwrap()
            .get(template)
            .map_or(0, VecDeque::len)
    }

    /// Ids of the idle sandboxes, per template (for memory accounting).
    pub fn idle_ids(&self) -> Vec<(String, String)> {
        let ready = self.ready.lock().unwrap();
        ready
            .iter()
            .flat_map(|(template, queue)| {
                queue
                    .iter()
                    .map(move |warm| (template.clone(), warm.booted.id.clone()))
            })
            .collect()
    }

    /// Empties the pool, returning what it held (for destruction at shutdown).
    pub fn drain(&self) -> Vec<WarmSandbox> {
        let mut ready = self.ready.lock().unwrap();
        ready
            .values_mut()
            .flat_map(|queue| queue.drain(..))
            .collect()
    }

    fn publish(&self, template: &str) {
        metrics::gauge!("pool_ready", "template" => template.to_string())
            .set(self.len(template) as f64);
    }
}
