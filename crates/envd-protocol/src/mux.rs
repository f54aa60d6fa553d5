//! Sessions over one byte stream: how the host reaches envd inside a
//! microVM.
//!
//! A VM has a single virtio-serial port. The host side of that port is
//! held by a relay process for the VM's whole life (the guest kernel only
//! learns reliably about a host that was there before the guest opened
//! the port), and every host connection to the relay becomes a session:
//!
//! ```text
//! frame = kind: u8 | session: u32 BE | length: u32 BE | payload
//! ```
//!
//! `Open` starts a session (host → guest), `Data` carries bytes either way,
//! `Close` ends one (either way). Each session carries one ordinary
//! HTTP/1.1 or HTTP/2 connection, so a server restart simply opens a new
//! session and whatever the old one left behind is dropped by id.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const HEADER_LEN: usize = 9;
/// Largest payload a sender puts in one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Open = 1,
    Data = 2,
    Close = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub session: u32,
    pub payload: Bytes,
}

impl Frame {
    pub fn open(session: u32) -> Self {
        Self {
            kind: FrameKind::Open,
            session,
            payload: Bytes::new(),
        }
    }

    pub fn data(session: u32, payload: Bytes) -> Self {
        Self {
            kind: FrameKind::Data,
            session,
            payload,
        }
    }

    pub fn close(session: u32) -> Self {
        Self {
            kind: FrameKind::Close,
            session,
            payload: Bytes::new(),
        }
    }

    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&[self.kind as u8]);
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out.freeze()
    }
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let kind = match header[0] {
        1 => FrameKind::Open,
        2 => FrameKind::Data,
        3 => FrameKind::Close,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown frame kind {other}"),
            ))
        }
    };
    let session = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
    let length = u32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
    if length > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {length} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut payload = vec![0u8; length];
    reader.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind,
        session,
        payload: payload.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let frames = [
            Frame::open(7),
            Frame::data(7, Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")),
            Frame::close(7),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
        let mut reader = &wire[..];
        for expected in &frames {
            assert_eq!(
                read_frame(&mut reader).await.unwrap().as_ref(),
                Some(expected)
            );
        }
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let mut reader = &[9u8, 0, 0, 0, 1, 0, 0, 0, 0][..];
        assert!(read_frame(&mut reader).await.is_err());
        let mut huge = Frame::data(1, Bytes::new()).encode().to_vec();
        huge[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_frame(&mut &huge[..]).await.is_err());
    }
}
