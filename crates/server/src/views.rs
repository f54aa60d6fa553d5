//! The JSON the API answers with, one type per shape. These are what the
//! Declaw SDKs parse and what `GET /openapi.json` describes; handlers
//! build them from domain types and never assemble answers by hand.

use crate::timefmt::iso_utc;
use sandbox_store::{Sandbox, Volume};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The port envd listens on in the SDKs' world; reported, never dialled.
pub const ENVD_PORT: u16 = 49983;

/// Every error: the SDKs read `message` and map the status to their
/// exception types.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorView {
    pub message: String,
    /// A stable machine-readable name (`not_found`, `sandbox_killed`,
    /// `template_not_ready`, `quota_exceeded`, …).
    pub code: String,
}

/// A sandbox. Create fields the service accepts but does not act on
/// (`network`, `lifecycle`, …) are echoed back as sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxView {
    pub sandbox_id: String,
    /// `tpl-` + the template name.
    pub template_id: String,
    /// The template name.
    pub name: String,
    #[schema(value_type = SandboxStateView)]
    pub state: &'static str,
    /// Seconds from the start (or the last `PATCH /timeout`) to the deadline.
    pub timeout: i64,
    pub metadata: BTreeMap<String, String>,
    pub envs: BTreeMap<String, String>,
    pub envd_port: u16,
    /// ISO 8601, UTC.
    pub started_at: String,
    /// When the deadline kills it; null without a deadline.
    pub end_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed_at: Option<String>,
    /// One entry per attached volume, in the order of the create.
    #[schema(value_type = Vec<AttachmentView>)]
    pub volumes: Value,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub echoed: Map<String, Value>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStateView {
    Running,
    Killed,
}

/// How one attached volume's private copy came out.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttachmentView {
    pub volume_id: String,
    pub mount_path: String,
    #[schema(value_type = AttachmentStatusView)]
    pub status: String,
    /// `hydrated`: unpacked for this sandbox; `layer`: a copy-on-write view
    /// of the node's layer of the volume (absent on sandboxes created before
    /// layers existed).
    #[schema(value_type = Option<AttachmentSourceView>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// Entries dropped: links, devices, fifos, `..` paths.
    pub skipped: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentStatusView {
    Ready,
    Failed,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentSourceView {
    Hydrated,
    Layer,
}

impl From<&Sandbox> for SandboxView {
    fn from(sandbox: &Sandbox) -> Self {
        let mut view = SandboxView {
            sandbox_id: sandbox.id.clone(),
            template_id: if sandbox.template.starts_with("tpl-") {
                sandbox.template.clone()
            } else {
                format!("tpl-{}", sandbox.template)
            },
            name: sandbox.template.clone(),
            state: sandbox.shown_state(),
            timeout: sandbox.timeout_secs,
            metadata: sandbox.metadata.clone(),
            envs: sandbox.envs.clone(),
            envd_port: ENVD_PORT,
            started_at: iso_utc(sandbox.started_at),
            end_at: sandbox.end_at.map(iso_utc),
            killed_at: sandbox.killed_at.map(iso_utc),
            volumes: sandbox.volumes.clone(),
            echoed: Map::new(),
        };
        // An echoed field never shadows one of ours.
        let ours = serde_json::to_value(&view).expect("a sandbox view serializes");
        view.echoed = sandbox
            .extra
            .iter()
            .filter(|(key, _)| ours.get(key.as_str()).is_none() && key.as_str() != "killed_at")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        view
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxListView {
    pub sandboxes: Vec<SandboxView>,
    /// Pass as `next_token` for the next page; null on the last.
    pub next_token: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxStatusView {
    pub is_running: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KilledView {
    /// False when there was nothing left to kill.
    pub killed: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuedView {
    pub queued: bool,
}

/// Per id: `{"killed": bool}`, `{"queued": true}` or `{"error": message}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum KillOutcomeView {
    Killed { killed: bool },
    Queued { queued: bool },
    Failed { error: String },
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KillManyView {
    pub results: BTreeMap<String, KillOutcomeView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OkView {
    pub ok: bool,
}

/// `{}`: the call succeeded and has nothing to say.
#[derive(Debug, Serialize, ToSchema, Default)]
pub struct EmptyView {}

/// A volume. `size_bytes` is the stored (compressed) blob size.
#[derive(Debug, Serialize, ToSchema)]
pub struct VolumeView {
    pub volume_id: String,
    pub owner_id: String,
    pub name: String,
    pub blob_key: String,
    pub size_bytes: i64,
    pub content_type: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
    /// Always `tarball`.
    pub backend: &'static str,
    pub quota_bytes: i64,
    pub sha256: String,
    pub uncompressed_bytes: i64,
    pub entry_count: i64,
}

impl From<Volume> for VolumeView {
    fn from(v: Volume) -> Self {
        VolumeView {
            volume_id: v.id,
            owner_id: v.owner_id,
            name: v.name,
            blob_key: v.blob_key,
            size_bytes: v.size_bytes,
            content_type: v.content_type,
            metadata: v.metadata,
            created_at: iso_utc(v.created_at),
            updated_at: iso_utc(v.updated_at),
            backend: "tarball",
            quota_bytes: 0,
            sha256: v.sha256,
            uncompressed_bytes: v.uncompressed_bytes,
            entry_count: v.entry_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VolumeListView {
    pub volumes: Vec<VolumeView>,
}

/// A finished command. Serialized straight from the agent's strings (no
/// intermediate JSON tree: outputs can be megabytes).
#[derive(Debug, Serialize, ToSchema)]
pub struct RunResultView {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// The command's own `timeout` ended it.
    pub timed_out: bool,
}

impl From<envd_protocol::types::RunResult> for RunResultView {
    fn from(result: envd_protocol::types::RunResult) -> Self {
        RunResultView {
            stdout: result.stdout,
            stderr: result.stderr,
            exit_code: result.exit_code,
            timed_out: result.timed_out,
        }
    }
}

/// What `POST /commands` answers: a foreground command's result, or with
/// `background` its handle.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum RunAnswerView {
    Finished(RunResultView),
    Started(StartedView),
}

/// A background command's handle.
#[derive(Debug, Serialize, ToSchema)]
pub struct StartedView {
    pub pid: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessView {
    pub pid: u32,
    pub cmd: String,
    pub is_pty: bool,
    pub envs: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryTypeView {
    File,
    Dir,
}

/// A file or directory inside a sandbox.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryView {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub entry_type: EntryTypeView,
    /// Bytes; 0 for directories.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// ISO 8601, UTC.
    pub modified: Option<String>,
}

impl From<envd_protocol::types::EntryInfo> for EntryView {
    fn from(entry: envd_protocol::types::EntryInfo) -> Self {
        use envd_protocol::types::FileType;
        let (entry_type, size) = match entry.file_type {
            FileType::Dir => (EntryTypeView::Dir, 0),
            FileType::File => (EntryTypeView::File, entry.size),
        };
        EntryView {
            name: entry.name,
            path: entry.path,
            entry_type,
            size,
            mode: entry.mode,
            modified: chrono::DateTime::from_timestamp(entry.mtime, 0).map(iso_utc),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WrittenFileView {
    pub path: String,
    pub size: u64,
}

impl From<envd_protocol::types::WriteInfo> for WrittenFileView {
    fn from(info: envd_protocol::types::WriteInfo) -> Self {
        WrittenFileView {
            path: info.path,
            size: info.size,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExistsView {
    pub exists: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedView {
    /// False when the directory was already there.
    pub created: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn sandbox(extra: Map<String, Value>) -> Sandbox {
        Sandbox {
            id: "sbx-1".into(),
            owner_id: "own-1".into(),
            template: "python".into(),
            state: sandbox_store::SandboxState::Running,
            node_id: "n".into(),
            envd_token: "secret".into(),
            timeout_secs: 300,
            metadata: BTreeMap::new(),
            envs: BTreeMap::new(),
            extra,
            volumes: json!([]),
            started_at: Utc::now(),
            end_at: None,
            killed_at: None,
            paused_at: None,
        }
    }

    #[test]
    fn echoed_fields_never_shadow_ours_and_secrets_stay_out() {
        let extra =
            json!({ "network": {"deny_out": ["0.0.0.0/0"]}, "state": "paused", "sandbox_id": "x" });
        let view = SandboxView::from(&sandbox(extra.as_object().unwrap().clone()));
        let body = serde_json::to_value(&view).unwrap();
        assert_eq!(body["state"], "running");
        assert_eq!(body["sandbox_id"], "sbx-1");
        assert_eq!(body["network"], json!({"deny_out": ["0.0.0.0/0"]}));
        assert_eq!(body["template_id"], "tpl-python");
        assert!(body.get("envd_token").is_none() && body.get("owner_id").is_none());
        assert!(body.get("killed_at").is_none());
        assert!(body["end_at"].is_null());
    }
}
