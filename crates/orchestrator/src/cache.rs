//! Node-local volume blob cache with single-flight fetches.
//!
//! N hydrates of one volume make one object-store GET: the first request
//! starts a download task that streams the blob into a cache file, and every
//! reader (the first included) tails that file as it grows, so nobody waits
//! for the whole download before starting to unpack. Entries are keyed by
//! volume id + sha256, evicted least-recently-used beyond a byte budget, and
//! dropped when their volume is deleted. The budget is hard: when entries
//! being read leave no room for a new blob, that blob streams straight from
//! object storage instead of being cached.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use sandbox_blobs::BlobStore;
use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    Downloading { written: u64 },
    Complete { size: u64 },
    Failed(String),
}

struct Entry {
    volume_id: String,
    /// The blob's stored size: what a fetch in progress will occupy.
    expected: u64,
    path: PathBuf,
    progress: watch::Receiver<Progress>,
    last_used: Mutex<Instant>,
}

pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    blobs: Arc<dyn BlobStore>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

/// What a hydrate needs to identify a blob.
#[derive(Debug, Clone)]
pub struct BlobRef {
    pub volume_id: String,
    pub sha256: String,
    pub key: String,
    /// Stored size, to decide whether it fits the budget before fetching.
    pub size: u64,
}

impl BlobCache {
    /// The object store behind the cache.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    pub fn new(dir: PathBuf, max_bytes: u64, blobs: Arc<dyn BlobStore>) -> std::io::Result<Self> {
        // Leftovers of an earlier run may be partial: start empty. Only our
        // own files go, in case the directory is shared with something else.
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("vol-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BlobCache {
            dir,
            max_bytes,
            blobs,
            entries: Mutex::default(),
        })
    }

    /// The blob's bytes, from the cache or a (shared) fetch in progress.
    pub async fn open(
        &self,
        blob: &BlobRef,
    ) -> std::io::Result<BoxStream<'static, std::io::Result<Bytes>>> {
        let cache_key = format!("{}-{}", blob.volume_id, blob.sha256);
        let entry = {
            let mut entries = self.entries.lock().unwrap();
            let usable = entries
                .get(&cache_key)
                .filter(|e| !matches!(*e.progress.borrow(), Progress::Failed(_)))
                .cloned();
            match usable {
                Some(entry) => {
                    metrics::counter!("blob_cache_hits_total").increment(1);
                    Some(entry)
                }
                None if self.make_room(&mut entries, blob.size) => {
                    let entry = self.start_fetch(&cache_key, blob)?;
                    entries.insert(cache_key, entry.clone());
                    Some(entry)
                }
                None => None,
            }
        };
        let Some(entry) = entry else {
            metrics::counter!("blob_cache_bypass_total").increment(1);
            tracing::info!(volume_id = %blob.volume_id, "blob cache full of entries in use: streaming from object storage");
            return self.direct(blob).await;
        };
        *entry.last_used.lock().unwrap() = Instant::now();
        let file = tokio::fs::File::open(&entry.path).await?;
        Ok(tail(entry, file).boxed())
    }

    /// The blob straight from object storage, uncached.
    async fn direct(
        &self,
        blob: &BlobRef,
    ) -> std::io::Result<BoxStream<'static, std::io::Result<Bytes>>> {
        metrics::counter!("blob_store_gets_total").increment(1);
        let reader = self
            .blobs
            .get(&blob.key)
            .await
            .map_err(std::io::Error::other)?;
        Ok(reader.stream)
    }

    fn start_fetch(&self, cache_key: &str, blob: &BlobRef) -> std::io::Result<Arc<Entry>> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(cache_key);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let (progress_tx, progress) = watch::channel(Progress::Downloading { written: 0 });
        let entry = Arc::new(Entry {
            volume_id: blob.volume_id.clone(),
            expected: blob.size,
            path,
            progress,
            last_used: Mutex::new(Instant::now()),
        });
        metrics::counter!("blob_store_gets_total").increment(1);
        let blobs = self.blobs.clone();
        let key = blob.key.clone();
        // The fetch is its own task: a reader that goes away must not cancel
        // it for the others.
        tokio::spawn(async move {
            let outcome =
                download(blobs, &key, tokio::fs::File::from_std(file), &progress_tx).await;
            let last = match outcome {
                Ok(size) => Progress::Complete { size },
                Err(e) => {
                    tracing::warn!(key, error = %e, "blob fetch failed");
                    Progress::Failed(e.to_string())
                }
            };
            progress_tx.send_replace(last);
        });
        Ok(entry)
    }

    /// Drops cached blobs of a deleted volume (readers in progress finish).
    pub fn forget_volume(&self, volume_id: &str) {
        let mut entries = self.entries.lock().unwrap();
        entries.retain(|_, entry| {
            let keep = entry.volume_id != volume_id;
            if !keep {
                let _ = std::fs::remove_file(&entry.path);
            }
            keep
        });
    }

    /// Drops entries of volumes not in `live` (deleted since); returns how
    /// many. Readers in progress finish from their open file.
    pub fn retain_volumes(&self, live: &std::collections::HashSet<String>) -> usize {
        let mut entries = self.entries.lock().unwrap();
        let before = entries.len();
        entries.retain(|_, entry| {
            let keep = live.contains(&entry.volume_id);
            if !keep {
                let _ = std::fs::remove_file(&entry.path);
            }
            keep
        });
        before - entries.len()
    }

    /// Evicts idle entries, oldest use first, until `incoming` more bytes
    /// fit the budget; false if entries in use leave too little room.
    /// Never touches an entry someone is reading or fetching.
    fn make_room(&self, entries: &mut HashMap<String, Arc<Entry>>, incoming: u64) -> bool {
        if incoming > self.max_bytes {
            return false;
        }
        // A fetch in progress is counted at the size it will reach.
        let size_of = |e: &Entry| match *e.progress.borrow() {
            Progress::Complete { size } => size,
            Progress::Downloading { written } => written.max(e.expected),
            Progress::Failed(_) => 0,
        };
        let budget = self.max_bytes.saturating_sub(incoming);
        let mut total: u64 = entries.values().map(|e| size_of(e)).sum();
        if total <= budget {
            return true;
        }
        let mut idle: Vec<(Instant, String, u64)> = entries
            .iter()
            .filter(|(_, e)| {
                Arc::strong_count(e) == 1
                    && !matches!(*e.progress.borrow(), Progress::Downloading { .. })
            })
            .map(|(k, e)| (*e.last_used.lock().unwrap(), k.clone(), size_of(e)))
            .collect();
        idle.sort();
        for (_, key, size) in idle {
            if total <= budget {
                break;
            }
            if let Some(entry) = entries.remove(&key) {
                let _ = std::fs::remove_file(&entry.path);
                total -= size;
            }
        }
        total <= budget
    }
}

async fn download(
    blobs: Arc<dyn BlobStore>,
    key: &str,
    mut file: tokio::fs::File,
    progress: &watch::Sender<Progress>,
) -> std::io::Result<u64> {
    let reader = blobs.get(key).await.map_err(std::io::Error::other)?;
    let mut stream = reader.stream;
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        file.write_all(&chunk).await?;
        // tokio's File hands writes to a blocking thread and returns before
        // they land; readers tail the file by `written`, so wait for it.
        file.flush().await?;
        written += chunk.len() as u64;
        metrics::counter!("blob_store_get_bytes_total").increment(chunk.len() as u64);
        progress.send_replace(Progress::Downloading { written });
    }
    if written != reader.size && reader.size != 0 {
        return Err(std::io::Error::other(format!(
            "blob {key} ended at {written} of {} bytes",
            reader.size
        )));
    }
    Ok(written)
}

/// Reads the cache file as far as it is written, waiting for more until the
/// fetch completes or fails.
fn tail(
    entry: Arc<Entry>,
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    const CHUNK: usize = 256 << 10;
    futures::stream::unfold(
        (entry, file, 0u64, false),
        |(entry, mut file, mut offset, done)| async move {
            if done {
                return None;
            }
            let mut progress = entry.progress.clone();
            loop {
                let state = progress.borrow_and_update().clone();
                let available = match &state {
                    Progress::Downloading { written } => *written,
                    Progress::Complete { size } => *size,
                    Progress::Failed(why) => {
                        let error = std::io::Error::other(format!("object storage: {why}"));
                        return Some((Err(error), (entry, file, offset, true)));
                    }
                };
                if offset < available {
                    let want = ((available - offset) as usize).min(CHUNK);
                    let mut buf = vec![0u8; want];
                    let read = async {
                        file.seek(SeekFrom::Start(offset)).await?;
                        file.read_exact(&mut buf).await?;
                        Ok::<_, std::io::Error>(())
                    }
                    .await;
                    return match read {
                        Ok(()) => {
                            offset += want as u64;
                            Some((Ok(Bytes::from(buf)), (entry, file, offset, false)))
                        }
                        Err(e) => Some((Err(e), (entry, file, offset, true))),
                    };
                }
                if matches!(state, Progress::Complete { .. }) {
                    return None;
                }
                if progress.changed().await.is_err() {
                    // Sender gone without a final state: treat as failure.
                    let error = std::io::Error::other("blob fetch ended unexpectedly");
                    return Some((Err(error), (entry, file, offset, true)));
                }
            }
        },
    )
}
