//! Volume blob storage behind one trait, chosen by configuration: S3 for
//! production and tests (Garage), a local directory for the embedded default.
//!
//! Uploads are incremental ([`BlobUpload`]) so the caller can validate bytes
//! as they stream and decide, only at the end, whether to commit or abort.
//! An upload dropped without either (a client that hung up) aborts itself.

mod local;
mod s3;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use local::LocalBlobStore;
pub use s3::{S3BlobStore, S3Settings};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob not found: {0}")]
    NotFound(String),
    #[error("object storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage error: {0}")]
    Backend(String),
}

pub type BlobResult<T> = Result<T, BlobError>;

/// A blob being read: its size and a stream of its bytes.
pub struct BlobReader {
    pub size: u64,
    pub stream: BoxStream<'static, std::io::Result<Bytes>>,
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// e.g. `s3://bucket@http://127.0.0.1:3900` or `local:/var/lib/…`.
    fn describe(&self) -> String;
    /// Cheap reachability check for `/health`.
    async fn check(&self) -> BlobResult<()>;
    async fn begin_upload(&self, key: &str) -> BlobResult<Box<dyn BlobUpload>>;
    async fn get(&self, key: &str) -> BlobResult<BlobReader>;
    /// Deleting a missing blob is not an error.
    async fn delete(&self, key: &str) -> BlobResult<()>;
    /// Keys of complete blobs under `prefix`.
    async fn list_keys(&self, prefix: &str) -> BlobResult<Vec<String>>;
    /// Keys of unfinished uploads under `prefix`.
    async fn pending_uploads(&self, prefix: &str) -> BlobResult<Vec<String>>;
    /// Aborts the unfinished uploads under `prefix` (a directory prefix or
    /// a whole key); returns how many. The caller decides which are dead.
    async fn abort_uploads(&self, prefix: &str) -> BlobResult<usize>;
}

#[async_trait]
pub trait BlobUpload: Send {
    async fn write(&mut self, chunk: Bytes) -> BlobResult<()>;
    /// Makes the blob visible; returns its size.
    async fn complete(self: Box<Self>) -> BlobResult<u64>;
    /// Discards everything written; nothing stays behind.
    async fn abort(self: Box<Self>) -> BlobResult<()>;
}

/// `owners/{owner_id}/volumes/{volume_id}.tar.gz`
pub fn volume_key(owner_id: &str, volume_id: &str) -> String {
    format!("owners/{owner_id}/volumes/{volume_id}.tar.gz")
}

/// The prefix under which every volume blob lives.
pub const VOLUMES_PREFIX: &str = "owners/";
