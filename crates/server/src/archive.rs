//! Validates a gzip-compressed tar while it streams past, without holding it.
//!
//! The async side feeds chunks through a bounded channel to a blocking
//! thread that runs a streaming gunzip + tar walk; the bound is what keeps
//! memory flat. If the archive turns out corrupt the thread stops early and
//! the feeder learns it at its next send.

use bytes::Bytes;
use std::io::{self, Read};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What a complete, valid archive contained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a gzip archive (the body must be a .tar.gz)")]
    NotGzip,
    #[error("corrupt archive: {0}")]
    Corrupt(String),
}

pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

pub struct ArchiveInspector {
    chunks: Option<mpsc::Sender<Bytes>>,
    walker: JoinHandle<Result<ArchiveSummary, ArchiveError>>,
}

impl ArchiveInspector {
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let walker = tokio::task::spawn_blocking(move || walk(ChannelReader::new(rx)));
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

    pub async fn finish(mut self) -> Result<ArchiveSummary, ArchiveError> {
        self.chunks.take();
        match (&mut self.walker).await {
            Ok(result) => result,
            Err(e) => Err(ArchiveError::Corrupt(format!("archive check failed: {e}"))),
        }
    }
}

fn walk(reader: ChannelReader) -> Result<ArchiveSummary, ArchiveError> {
    let corrupt = |e: io::Error| ArchiveError::Corrupt(e.to_string());
    let mut gunzip = flate2::read::MultiGzDecoder::new(reader);
    let mut summary = ArchiveSummary::default();
    {
        let mut archive = tar::Archive::new(&mut gunzip);
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            summary.entries += 1;
            summary.uncompressed_bytes += io::copy(&mut entry, &mut io::sink()).map_err(corrupt)?;
        }
    }
    // Read past the end-of-archive blocks so a truncated gzip trailer (CRC,
    // length) is noticed too.
    io::copy(&mut gunzip, &mut io::sink()).map_err(corrupt)?;
    Ok(summary)
}

/// `Read` over chunks arriving from async code.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
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
        let mut inspector = ArchiveInspector::start();
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
    async fn truncated_archive_is_corrupt() {
        let mut data = targz(&[("a.txt", vec![1u8; 100_000])]);
        data.truncate(data.len() - 20);
        assert!(matches!(
            inspect(data, 1000).await,
            Err(ArchiveError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn gzip_of_garbage_is_corrupt() {
        assert!(matches!(
            inspect(gzip(&[0xAB; 4096]), 512).await,
            Err(ArchiveError::Corrupt(_))
        ));
    }
}
