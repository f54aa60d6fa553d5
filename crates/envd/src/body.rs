//! Bridges an async request body to blocking file I/O: the body is pumped
//! into a bounded channel and a blocking thread reads it as `std::io::Read`
//! (or chunk by chunk), so memory stays flat whatever the body size.

use std::io::{self, Read};

use axum::body::Body;
use bytes::{Buf, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;

/// Chunks in flight between the connection and the writer thread.
pub const CHANNEL_DEPTH: usize = 32;

pub type ChunkSender = mpsc::Sender<io::Result<Bytes>>;

/// Forwards `body` into `sender` until the body ends or the reader goes away.
/// A body error is forwarded as an error, never as a clean end, so a cut
/// upload cannot look like a complete one.
pub async fn pump(body: Body, sender: ChunkSender) {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let item = chunk.map_err(|e| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("request body: {e}"))
        });
        let failed = item.is_err();
        if sender.send(item).await.is_err() || failed {
            return;
        }
    }
}

pub fn channel() -> (ChunkSender, BodyReader) {
    let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
    (
        sender,
        BodyReader {
            receiver,
            current: Bytes::new(),
        },
    )
}

/// Blocking reader over the chunks sent by [`pump`]. Must only be used from a
/// blocking thread (`spawn_blocking`).
pub struct BodyReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl BodyReader {
    /// Next non-empty chunk, or `None` at the end of the body.
    pub fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.current.is_empty() {
            return Ok(Some(std::mem::take(&mut self.current)));
        }
        loop {
            match self.receiver.blocking_recv() {
                None => return Ok(None),
                Some(Err(error)) => return Err(error),
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => return Ok(Some(chunk)),
            }
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.current.is_empty() {
            match self.next_chunk()? {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let length = buf.len().min(self.current.len());
        buf[..length].copy_from_slice(&self.current[..length]);
        self.current.advance(length);
        Ok(length)
    }
}
