//! Pause and resume: the driver stops every process of a sandbox where it
//! stands (cgroup freezer, or a VM's vCPUs), memory kept, and the row says
//! so. While paused the deadline is on hold and no call reaches the agent
//! (it is frozen too): they get a 409 from [`Orchestrator::agent`]. On
//! resume the deadline moves on by the time spent paused.

use super::{Orchestrator, Result};
use crate::error::OrchestratorError;
use chrono::Utc;
use sandbox_runtime::RuntimeError;
use sandbox_store::SandboxState;

impl Orchestrator {
    pub async fn pause(&self, owner_id: &str, id: &str) -> Result<()> {
        let _one_at_a_time = self.pausing.lock().await;
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        if sandbox.is_paused() {
            return Err(OrchestratorError::NotPausable(format!(
                "sandbox {id} is already paused"
            )));
        }
        let runtime = self.runtime()?;
        runtime.pause(id).await.map_err(|e| match e {
            RuntimeError::Unsupported(why) => OrchestratorError::NotPausable(why),
            other => OrchestratorError::Runtime {
                step: "pausing",
                source: other,
            },
        })?;
        self.deadlines.cancel(id);
        let paused = self
            .store
            .set_sandbox_paused(owner_id, id, Some(Utc::now()), sandbox.end_at)
            .await;
        if !matches!(paused, Ok(true)) {
            // Killed meanwhile, or the row could not be written: never
            // leave a frozen machine the row calls running.
            self.thaw_quietly(id).await;
            if let Some(at) = sandbox.end_at {
                self.arm_deadline(id, at);
            }
            paused?;
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        metrics::counter!("sandboxes_paused_total").increment(1);
        tracing::info!(sandbox_id = id, owner_id, "sandbox paused");
        Ok(())
    }

    /// Resumes a paused sandbox; one that runs already is left alone.
    pub async fn resume(&self, owner_id: &str, id: &str) -> Result<()> {
        let _one_at_a_time = self.pausing.lock().await;
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        let Some(paused_at) = sandbox.paused_at else {
            return Ok(());
        };
        self.runtime()?
            .resume(id)
            .await
            .map_err(OrchestratorError::runtime("resuming"))?;
        let now = Utc::now();
        let held = now - paused_at;
        let end_at = sandbox
            .end_at
            .map(|at| at + held.max(chrono::Duration::zero()));
        if !self
            .store
            .set_sandbox_paused(owner_id, id, None, end_at)
            .await?
        {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        if let Some(at) = end_at {
            self.arm_deadline(id, at);
        }
        tracing::info!(
            sandbox_id = id,
            owner_id,
            paused_ms = held.num_milliseconds(),
            "sandbox resumed"
        );
        Ok(())
    }

    async fn thaw_quietly(&self, id: &str) {
        if let Ok(runtime) = self.runtime() {
            if let Err(e) = runtime.resume(id).await {
                tracing::warn!(sandbox_id = id, error = %e, "could not undo a pause");
            }
        }
    }
}
