//! Validates a gzip-compressed tar while it streams past, without holding it.
//!
//! The async side feeds chunks through a bounded channel to a blocking
//! thread that runs a streaming gunzip + tar walk and hashes the blob; the
//! bound is what keeps memory flat. Hashing there, not on the async side,
//! puts it on the other core while the request's task moves bytes to
//! object storage. If the archive turns out corrupt the thread stops early
//! and the feeder learns it at its next send.

use bytes::Bytes;
use sandbox_archive::{Gunzip, Limits};
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use sandbox_archive::{ArchiveError, Summary as ArchiveSummary, GZIP_MAGIC};

/// Chunks queued for the walker; each may pin one of hyper's read buffers
/// (up to ~400 KiB), so this stays small.
const QUEUED_CHUNKS: usize = 8;

pub struct ArchiveInspector {
    chunks: Option<mpsc::Sender<Bytes>>,
    walker: JoinHandle<Result<Inspected, ArchiveError>>,
}

/// What a valid archive turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub summary: ArchiveSummary,
    /// Hex SHA-256 of every byte fed.
    pub sha256: String,
}

impl ArchiveInspector {
    /// Starts the walk. It only ever works on bytes the client sent (every
    /// limit is checked before acting on a declared size), and it ends as
    /// soon as the feeder goes away: a dropped inspector is a truncated
    /// archive, so no thread outlives its upload.
    pub fn start(limits: Limits) -> Self {
        let (tx, rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let walker = tokio::task::spawn_blocking(move || walk(ChannelReader::new(rx), limits));
        ArchiveInspector {
            chunks: Some(tx),
            walker,
        }
    }

    /// Feeds one chunk. Returns false once the walker has stopped (the
    /// archive is already known to be bad); `finish` then says why.
    pub async fn feed(&mut self, chunk: Bytes) -> bool {
        match &self.chunks {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }

    pub async fn finish(mut self) -> Result<Inspected, ArchiveError> {
        self.chunks.take();
        match (&mut self.walker).await {
            Ok(result) => result,
            Err(e) => Err(ArchiveError::Corrupt(format!("archive check failed: {e}"))),
        }
    }
}

fn walk(mut reader: ChannelReader, limits: Limits) -> Result<Inspected, ArchiveError> {
    // `scan` reads to the end of the gzip stream, so a truncated trailer
    // (CRC, length) is noticed too; the ratio guard bounds that tail.
    let summary = sandbox_archive::scan(Gunzip::new(&mut reader, &limits), limits)?;
    // Anything the walk did not need to read is stored too: hash it.
    io::copy(&mut reader, &mut io::sink()).map_err(ArchiveError::Io)?;
    Ok(Inspected {
        summary,
        sha256: hex::encode(reader.hasher.finalize()),
    })
}

/// `Read` over chunks arriving from async code.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    /// Every chunk received, in order.
    hasher: Sha256,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            hasher: Sha256::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.hasher.update(&chunk);
                    self.current = chunk;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::{gzip, targz};

    async fn inspect(data: Vec<u8>, chunk: usize) -> Result<ArchiveSummary, ArchiveError> {
        inspect_with(data, chunk, Limits::default())
            .await
            .map(|inspected| inspected.summary)
    }

    async fn inspect_with(
        data: Vec<u8>,
        chunk: usize,
        limits: Limits,
    ) -> Result<Inspected, ArchiveError> {
        let mut inspector = ArchiveInspector::start(limits);
        for piece in data.chunks(chunk) {
            if !inspector.feed(Bytes::copy_from_slice(piece)).await {
                break;
            }
        }
        inspector.finish().await
    }

    #[tokio::test]
    async fn counts_entries_and_bytes() {
        let data = targz(&[("a.txt", b"hello".to_vec()), ("dir/b.bin", vec![7u8; 3000])]);
        let summary = inspect(data, 7).await.unwrap();
        assert_eq!(
            summary,
            ArchiveSummary {
                entries: 2,
                uncompressed_bytes: 3005
            }
        );
    }

    #[tokio::test]
    async fn hashes_every_byte_fed() {
        let data = targz(&[("a.txt", vec![3u8; 50_000]), ("b.txt", b"b".to_vec())]);
        let inspected = inspect_with(data.clone(), 333, Limits::default())
            .await
            .unwrap();
        assert_eq!(inspected.sha256, testkit::sha256_hex(&data));
        assert_eq!(inspected.summary.entries, 2);
    }

    #[tokio::test]
    async fn truncated_archive_is_corrupt() {
        let mut data = targz(&[("a.txt", vec![1u8; 100_000])]);
        data.truncate(data.len() - 20);
        assert!(matches!(
            inspect(data, 1000).await,
            Err(ArchiveError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn limits_name_what_was_exceeded() {
        let data = targz(&[("a", vec![1u8; 10]), ("b", vec![2u8; 10])]);
        let limits = Limits {
            max_entries: 1,
            ..Limits::default()
        };
        let error = inspect_with(data, 100, limits).await.unwrap_err();
        assert!(error.to_string().contains("more than 1 entries"), "{error}");
    }

    #[tokio::test]
    async fn a_walk_ends_when_its_feeder_goes_away() {
        let mut inspector = ArchiveInspector::start(Limits::default());
        let data = targz(&[("a", vec![1u8; 1 << 20])]);
        assert!(inspector.feed(Bytes::copy_from_slice(&data[..100])).await);
        let walker = inspector.walker;
        drop(inspector.chunks);
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), walker)
            .await
            .expect("the walk ends once the upload is gone")
            .unwrap();
        assert!(
            matches!(outcome, Err(ArchiveError::Corrupt(_))),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn gzip_of_garbage_is_corrupt() {
        assert!(matches!(
            inspect(gzip(&[0xAB; 4096]), 512).await,
            Err(ArchiveError::Corrupt(_))
        ));
    }
}
