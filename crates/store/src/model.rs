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
    Ready,
    Deleted,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Ready => "ready",
            VolumeState::Deleted => "deleted",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "ready" => VolumeState::Ready,
            _ => VolumeState::Deleted,
        }
    }
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
