//! One sleeping task per sandbox deadline. Re-arming replaces the task, so
//! a `PATCH /timeout` resets the countdown.

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use tokio::task::JoinHandle;

#[derive(Default)]
pub struct Deadlines {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Deadlines {
    /// Runs `on_expiry` at `at` unless re-armed or cancelled first.
    pub fn arm<F>(&self, id: &str, at: DateTime<Utc>, on_expiry: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let task = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            on_expiry.await;
        });
        if let Some(previous) = self.tasks.lock().unwrap().insert(id.to_string(), task) {
            previous.abort();
        }
    }

    pub fn cancel(&self, id: &str) {
        if let Some(task) = self.tasks.lock().unwrap().remove(id) {
            task.abort();
        }
    }

    /// Stops every timer (the process is handing over to its successor,
    /// which arms them again from the database).
    pub fn cancel_all(&self) {
        for (_, task) in self.tasks.lock().unwrap().drain() {
            task.abort();
        }
    }

    /// Forgets a finished timer without aborting it (called from the timer).
    pub fn forget(&self, id: &str) {
        self.tasks.lock().unwrap().remove(id);
    }
}
