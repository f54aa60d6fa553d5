//! Blobs as files under one directory. An upload writes a hidden temporary
//! file beside its target and renames it into place on completion, so a
//! reader never sees half a blob.

use crate::{BlobError, BlobReader, BlobResult, BlobStore, BlobUpload};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Component, Path, PathBuf};
use tokio::fs;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio_util::io::ReaderStream;

const PARTIAL_SUFFIX: &str = ".partial";

pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    pub async fn open(root: impl Into<PathBuf>) -> BlobResult<Self> {
        let root = root.into();
        fs::create_dir_all(&root).await?;
        // Tenants' data: readable by this service's user alone.
        fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700)).await?;
        Ok(LocalBlobStore { root })
    }

    /// Keys are produced by this program, but refuse anything that could
    /// name a file outside the root all the same.
    fn path_of(&self, key: &str) -> BlobResult<PathBuf> {
        let relative = Path::new(key);
        let safe = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !safe || key.is_empty() {
            return Err(BlobError::Backend(format!("invalid blob key {key:?}")));
        }
        Ok(self.root.join(relative))
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }

    async fn check(&self) -> BlobResult<()> {
        fs::metadata(&self.root).await?;
        Ok(())
    }

    async fn begin_upload(&self, key: &str) -> BlobResult<Box<dyn BlobUpload>> {
        let target = self.path_of(key)?;
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).await?;
        }
        let partial = target.with_file_name(format!(
            ".{}.{}{PARTIAL_SUFFIX}",
            target.file_name().unwrap_or_default().to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .await?;
        Ok(Box::new(LocalUpload {
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            partial,
            target,
            written: 0,
        }))
    }

    async fn get(&self, key: &str) -> BlobResult<BlobReader> {
        let path = self.path_of(key)?;
        let file = match fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(key.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata().await?.len();
        Ok(BlobReader {
            size,
            stream: ReaderStream::with_capacity(file, 256 << 10).boxed(),
        })
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        match fs::remove_file(self.path_of(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn list_keys(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let files = self.files_under(prefix).await?;
        Ok(files.into_iter().filter(|key| !is_partial(key)).collect())
    }

    /// Keys (of the blobs they would become) of partial files.
    async fn pending_uploads(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let mut keys: Vec<String> = self
            .partials_under(prefix)
            .await?
            .into_iter()
            .map(|(_, target)| target)
            .collect();
        keys.dedup();
        Ok(keys)
    }

    async fn abort_uploads(&self, prefix: &str) -> BlobResult<usize> {
        let mut removed = 0;
        for (key, _) in self.partials_under(prefix).await? {
            fs::remove_file(self.root.join(&key))
                .await
                .or_else(ignore_not_found)?;
            removed += 1;
        }
        Ok(removed)
    }
}

fn is_partial(key: &str) -> bool {
    key.ends_with(PARTIAL_SUFFIX)
}

/// `dir/.name.<uuid>.partial` → `dir/name`: the key the upload would commit.
fn partial_target(key: &str) -> Option<String> {
    let (dir, file) = match key.rsplit_once('/') {
        Some((dir, file)) => (Some(dir), file),
        None => (None, key),
    };
    let stem = file.strip_prefix('.')?.strip_suffix(PARTIAL_SUFFIX)?;
    let (name, _uuid) = stem.rsplit_once('.')?;
    Some(match dir {
        Some(dir) => format!("{dir}/{name}"),
        None => name.to_string(),
    })
}

impl LocalBlobStore {
    /// Partial files whose target key starts with `prefix` (a directory
    /// prefix or a whole key), as (own key, target key).
    async fn partials_under(&self, prefix: &str) -> BlobResult<Vec<(String, String)>> {
        let dir = if prefix.ends_with('/') {
            prefix
        } else {
            prefix.rsplit_once('/').map_or("", |(dir, _)| dir)
        };
        Ok(self
            .files_under(dir)
            .await?
            .into_iter()
            .filter_map(|key| {
                let target = partial_target(&key)?;
                target.starts_with(prefix).then_some((key, target))
            })
            .collect())
    }

    /// Every file below `prefix` (the whole store for ""), as keys.
    async fn files_under(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let prefix = prefix.trim_end_matches('/');
        let start = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path_of(prefix)?
        };
        let root = self.root.clone();
        let walk = move || {
            let mut found = Vec::new();
            let mut pending = vec![start];
            while let Some(dir) = pending.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Ok(meta) = entry.metadata() else { continue };
                    if meta.is_dir() {
                        pending.push(path);
                    } else if let Ok(relative) = path.strip_prefix(&root) {
                        found.push(relative.to_string_lossy().into_owned());
                    }
                }
            }
            found
        };
        tokio::task::spawn_blocking(walk)
            .await
            .map_err(|e| BlobError::Backend(e.to_string()))
    }
}

struct LocalUpload {
    file: Option<BufWriter<fs::File>>,
    partial: PathBuf,
    target: PathBuf,
    written: u64,
}

#[async_trait]
impl BlobUpload for LocalUpload {
    async fn write(&mut self, chunk: Bytes) -> BlobResult<()> {
        let file = self.file.as_mut().expect("upload already finished");
        file.write_all(&chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> BlobResult<u64> {
        let mut file = self.file.take().expect("upload already finished");
        file.flush().await?;
        file.get_ref().sync_all().await?;
        fs::rename(&self.partial, &self.target).await?;
        Ok(self.written)
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.file.take();
        fs::remove_file(&self.partial)
            .await
            .or_else(ignore_not_found)?;
        Ok(())
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // Neither completed nor aborted: the request went away mid-stream.
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

fn ignore_not_found(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod partial_tests {
    use super::partial_target;

    #[test]
    fn a_partial_names_the_key_it_would_commit() {
        assert_eq!(
            partial_target("owners/o/volumes/.vol-1.tar.gz.0123abcd.partial").as_deref(),
            Some("owners/o/volumes/vol-1.tar.gz")
        );
        assert_eq!(partial_target(".k.u.partial").as_deref(), Some("k"));
        assert_eq!(partial_target("owners/o/volumes/vol-1.tar.gz"), None);
    }
}
