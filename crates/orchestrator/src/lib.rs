//! The orchestrator: turns API calls into sandboxes. It owns the warm pool,
//! the create/kill lifecycle, deadlines, restart reconciliation and volume
//! hydration, and hands out envd clients for running sandboxes.

mod cache;
mod egress;
mod error;
mod hydrate;
mod ids;
mod layers;
mod lifecycle;
mod pool;
mod recipe;
mod timers;
mod unrecorded;

pub use cache::BlobCache;
pub use error::OrchestratorError;
pub use hydrate::{Attachment, HydrateOutcome, HydrateSource, HydrateStatus, UnpackLimits};
pub use ids::new_sandbox_id;
pub use layers::{LayerInfo, LayerStats, LayerStore};
pub use lifecycle::{
    BuildConfig, BuildRequest, BuildState, CreateSandbox, Orchestrator, OrchestratorConfig,
    UsageSample, TRUNCATED,
};
pub use recipe::{BuildRecipe, BuildStep};
