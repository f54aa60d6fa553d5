//! `GET /sandboxes/{id}/metrics`: CPU, memory and disk use. CPU time and
//! memory come from the host where the driver counts them (a container's
//! cgroup), otherwise from the sandbox's own kernel through its agent (a
//! VM); disk use always comes from the agent (the filesystem under `/`).
//! Each call takes a fresh sample; the last [`HISTORY`] samples of a
//! sandbox are kept in memory, so a caller polling gets a series.

use super::{Orchestrator, Result};
use crate::error::OrchestratorError;
use chrono::{DateTime, Utc};
use sandbox_store::{Sandbox, SandboxState};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples kept per sandbox.
const HISTORY: usize = 120;
/// Without a recent reading to compare with, CPU use is measured over this.
const CPU_WINDOW: Duration = Duration::from_millis(250);
/// A previous reading older than this is too coarse to compare with.
const CPU_READING_FRESH: Duration = Duration::from_secs(30);

/// One point of a sandbox's metrics series.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageSample {
    pub timestamp: DateTime<Utc>,
    /// Busy share of the sandbox's vCPUs since the previous reading, 0–100.
    pub cpu_usage_percent: f64,
    pub cpu_count: u32,
    pub memory_usage_mb: f64,
    pub memory_limit_mb: u64,
    pub disk_usage_mb: f64,
    pub disk_limit_mb: u64,
}

/// Per-sandbox state between calls.
#[derive(Default)]
pub(crate) struct UsageHistory {
    samples: VecDeque<UsageSample>,
    /// The last CPU counter read and when.
    cpu: Option<(Instant, u64)>,
}

impl Orchestrator {
    /// The sandbox's samples from `start` to `end` (either open), ending
    /// with one taken now unless it is paused (its agent is frozen then).
    pub async fn usage(
        &self,
        owner_id: &str,
        id: &str,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Vec<UsageSample>> {
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        if !sandbox.is_paused() {
            let sample = self.sample_usage(&sandbox).await?;
            let mut histories = self.usage.lock().unwrap();
            let history = histories.entry(id.to_string()).or_default();
            if history.samples.len() == HISTORY {
                history.samples.pop_front();
            }
            history.samples.push_back(sample);
        }
        let histories = self.usage.lock().unwrap();
        let samples = histories
            .get(id)
            .map(|h| h.samples.iter())
            .into_iter()
            .flatten();
        Ok(samples
            .filter(|s| start.is_none_or(|at| s.timestamp >= at))
            .filter(|s| end.is_none_or(|at| s.timestamp <= at))
            .cloned()
            .collect())
    }

    pub(crate) fn forget_usage(&self, id: &str) {
        self.usage.lock().unwrap().remove(id);
    }

    async fn sample_usage(&self, sandbox: &Sandbox) -> Result<UsageSample> {
        let runtime = self.runtime()?.clone();
        let agent = self.agent(&sandbox.owner_id, &sandbox.id).await?;
        let limits = self.templates.get(&sandbox.template).map(|t| t.limits());
        let read_cpu = || async {
            let counted = match runtime.host_usage(&sandbox.id) {
                Some(host) => (host.cpu_usec, host.memory_bytes, None),
                None => {
                    let inside = agent.usage().await?;
                    (inside.cpu_busy_usec, inside.memory_used_bytes, Some(inside))
                }
            };
            Ok::<_, OrchestratorError>((Instant::now(), counted))
        };
        let previous = self
            .usage
            .lock()
            .unwrap()
            .get(&sandbox.id)
            .and_then(|h| h.cpu)
            .filter(|(at, _)| at.elapsed() < CPU_READING_FRESH);
        let (then, before) = match previous {
            Some(reading) => reading,
            None => {
                let (at, (cpu, _, _)) = read_cpu().await?;
                tokio::time::sleep(CPU_WINDOW).await;
                (at, cpu)
            }
        };
        let (now, (cpu_usec, memory_bytes, inside)) = read_cpu().await?;
        let inside = match inside {
            Some(inside) => inside,
            None => agent.usage().await?,
        };
        self.usage
            .lock()
            .unwrap()
            .entry(sandbox.id.clone())
            .or_default()
            .cpu = Some((now, cpu_usec));
        let cpu_count = limits.map_or(inside.cpu_count, |l| l.vcpus).max(1);
        let elapsed_usec = now.duration_since(then).as_micros().max(1) as f64;
        let busy = cpu_usec.saturating_sub(before) as f64;
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        Ok(UsageSample {
            timestamp: Utc::now(),
            cpu_usage_percent: (busy / elapsed_usec / f64::from(cpu_count) * 100.0)
                .clamp(0.0, 100.0),
            cpu_count,
            memory_usage_mb: mib(memory_bytes),
            memory_limit_mb: limits.map_or(inside.memory_total_bytes >> 20, |l| l.memory_mb),
            disk_usage_mb: mib(inside.disk_used_bytes),
            disk_limit_mb: inside.disk_total_bytes >> 20,
        })
    }
}
