use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Owner {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Row written before the blob: an upload in progress (or a crashed
    /// one, which the reconciler removes). Invisible to the API.
    Pending,
    Ready,
    Deleted,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Pending => "pending",
            VolumeState::Ready => "ready",
            VolumeState::Deleted => "deleted",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "ready" => VolumeState::Ready,
            "pending" => VolumeState::Pending,
            _ => VolumeState::Deleted,
        }
    }
}

/// What an owner currently uses, for quota checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub running_sandboxes: i64,
    /// Ready volumes (uploads in flight are the caller's to count).
    pub volumes: i64,
    /// Stored (compressed) bytes of those volumes.
    pub volume_bytes: i64,
}

/// Per-owner quota overrides; `None` means the configured default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct QuotaOverride {
    pub max_running_sandboxes: Option<i64>,
    pub max_volumes: Option<i64>,
    pub max_volume_bytes: Option<i64>,
}

/// Rows removed by one [`crate::Store::sweep`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepCounts {
    pub idempotency_keys: u64,
    pub killed_sandboxes: u64,
    pub deleted_volumes: u64,
}

/// What the upload pipeline knows once a blob is stored and validated.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub blob_key: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub uncompressed_bytes: i64,
    pub entry_count: i64,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Volume {
    pub id: String,
    pub owner_id: String,
    pub name: String,
    pub blob_key: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub content_type: String,
    pub uncompressed_bytes: i64,
    pub entry_count: i64,
    pub metadata: BTreeMap<String, String>,
    pub state: VolumeState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Row shape shared by both backends; converted into [`Volume`].
#[derive(sqlx::FromRow)]
pub(crate) struct VolumeRow {
    id: String,
    owner_id: String,
    name: String,
    blob_key: String,
    size_bytes: i64,
    sha256: String,
    content_type: String,
    uncompressed_bytes: i64,
    entry_count: i64,
    metadata: sqlx::types::Json<BTreeMap<String, String>>,
    state: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<VolumeRow> for Volume {
    fn from(row: VolumeRow) -> Self {
        Volume {
            id: row.id,
            owner_id: row.owner_id,
            name: row.name,
            blob_key: row.blob_key,
            size_bytes: row.size_bytes,
            sha256: row.sha256,
            content_type: row.content_type,
            uncompressed_bytes: row.uncompressed_bytes,
            entry_count: row.entry_count,
            metadata: row.metadata.0,
            state: VolumeState::parse(&row.state),
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Running,
    Killed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Killed => "killed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(SandboxState::Running),
            "killed" => Some(SandboxState::Killed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub owner_id: String,
    pub template: String,
    pub state: SandboxState,
    pub node_id: String,
    pub envd_token: String,
    pub timeout_secs: i64,
    pub metadata: BTreeMap<String, String>,
    pub envs: BTreeMap<String, String>,
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub volumes: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub end_at: Option<DateTime<Utc>>,
    pub killed_at: Option<DateTime<Utc>>,
    /// Set while a running sandbox is paused.
    pub paused_at: Option<DateTime<Utc>>,
}

impl Sandbox {
    pub fn is_paused(&self) -> bool {
        self.state == SandboxState::Running && self.paused_at.is_some()
    }

    /// What clients see: `running`, `paused` or `killed`.
    pub fn shown_state(&self) -> &'static str {
        if self.is_paused() {
            "paused"
        } else {
            self.state.as_str()
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct SandboxRow {
    id: String,
    owner_id: String,
    template: String,
    state: String,
    node_id: String,
    envd_token: String,
    timeout_secs: i64,
    metadata: sqlx::types::Json<BTreeMap<String, String>>,
    envs: sqlx::types::Json<BTreeMap<String, String>>,
    extra: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    volumes: sqlx::types::Json<serde_json::Value>,
    started_at: DateTime<Utc>,
    end_at: Option<DateTime<Utc>>,
    killed_at: Option<DateTime<Utc>>,
    paused_at: Option<DateTime<Utc>>,
}

impl From<SandboxRow> for Sandbox {
    fn from(row: SandboxRow) -> Self {
        Sandbox {
            id: row.id,
            owner_id: row.owner_id,
            template: row.template,
            state: SandboxState::parse(&row.state).unwrap_or(SandboxState::Killed),
            node_id: row.node_id,
            envd_token: row.envd_token,
            timeout_secs: row.timeout_secs,
            metadata: row.metadata.0,
            envs: row.envs.0,
            extra: row.extra.0,
            volumes: row.volumes.0,
            started_at: row.started_at,
            end_at: row.end_at,
            killed_at: row.killed_at,
            paused_at: row.paused_at,
        }
    }
}

/// A state a listing can ask for (paused is a running sandbox on hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListedState {
    Running,
    Paused,
    Killed,
}

impl ListedState {
    /// The SQL condition; a closed set, so it is safe to inline.
    pub(crate) fn condition(self) -> &'static str {
        match self {
            ListedState::Running => "(state = 'running' AND paused_at IS NULL)",
            ListedState::Paused => "(state = 'running' AND paused_at IS NOT NULL)",
            ListedState::Killed => "state = 'killed'",
        }
    }
}

/// Which page of a sandbox listing to return: newest first, strictly older
/// than the cursor when one is given.
#[derive(Debug, Clone, Default)]
pub struct SandboxPage {
    pub states: Vec<ListedState>,
    pub limit: i64,
    pub before: Option<(DateTime<Utc>, String)>,
}

/// The outcome of claiming an idempotency key for a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// First use: go ahead, then record the response.
    Fresh,
    /// The first request with this key is still running.
    InProgress,
    /// Already answered: replay this.
    Done { status: u16, response: String },
    /// Same key, different request body.
    Mismatch,
}

/// An owner's custom template (see `migrations/*/0005_templates.sql`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CustomTemplate {
    pub id: String,
    pub owner_id: String,
    pub alias: String,
    /// The build recipe, as the orchestrator serialised it.
    pub spec: sqlx::types::Json<serde_json::Value>,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    /// The build sandboxes get; `None` until one succeeded.
    pub ready_build: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Building,
    Completed,
    Failed,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Building => "building",
            BuildStatus::Completed => "completed",
            BuildStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "building" => BuildStatus::Building,
            "completed" => BuildStatus::Completed,
            _ => BuildStatus::Failed,
        }
    }
}

/// One build of a custom template.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TemplateBuild {
    pub id: String,
    pub template_id: String,
    pub owner_id: String,
    pub status: String,
    pub logs: sqlx::types::Json<Vec<String>>,
    pub node_id: String,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A filesystem snapshot of a sandbox (see `0006_snapshots.sql`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SandboxSnapshot {
    pub id: String,
    pub owner_id: String,
    pub sandbox_id: String,
    pub template: String,
    /// `manual` (the only kind taken here so far).
    pub source: String,
    pub blob_key: String,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}
