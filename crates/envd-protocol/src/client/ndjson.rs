//! Decoding of the newline-delimited JSON event streams (`/processes/stream`, `/pty/{pid}/stream`).

use bytes::{Buf, BytesMut};
use futures::stream::{self, BoxStream, StreamExt};
use http_body_util::BodyDataStream;
use hyper::body::Incoming;

use serde::de::DeserializeOwned;

use super::EnvdError;

/// Lines longer than this are a protocol error: envd sends output in chunks
/// of at most 64 KiB, which JSON-escape to under 400 KiB.
const MAX_LINE: usize = 1024 * 1024;

struct State {
    body: BodyDataStream<Incoming>,
    buffer: BytesMut,
    /// Bytes of `buffer` already known to hold no newline: each byte is
    /// scanned once, however the line is split into chunks.
    scanned: usize,
    done: bool,
}

/// Stream of typed events; blank lines (keep-alives) are skipped.
pub fn events<E: DeserializeOwned + Send + 'static>(
    body: Incoming,
) -> BoxStream<'static, Result<E, EnvdError>> {
    let state = State {
        body: BodyDataStream::new(body),
        buffer: BytesMut::new(),
        scanned: 0,
        done: false,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            let unscanned = &state.buffer[state.scanned..];
            if let Some(found) = unscanned.iter().position(|&b| b == b'\n') {
                let newline = state.scanned + found;
                state.scanned = 0;
                let line = state.buffer.split_to(newline + 1);
                let line = &line[..newline];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event = serde_json::from_slice::<E>(line)
                    .map_err(|e| EnvdError::Decode(format!("bad event line: {e}")));
                return Some((event, state));
            }
            if state.done {
                if state.buffer.has_remaining() && !state.buffer.iter().all(u8::is_ascii_whitespace)
                {
                    let line = std::mem::take(&mut state.buffer);
                    let event = serde_json::from_slice::<E>(&line)
                        .map_err(|e| EnvdError::Decode(format!("bad event line: {e}")));
                    return Some((event, state));
                }
                return None;
            }
            state.scanned = state.buffer.len();
            if state.buffer.len() > MAX_LINE {
                state.done = true;
                state.buffer.clear();
                return Some((Err(EnvdError::Decode("event line too long".into())), state));
            }
            match state.body.next().await {
                Some(Ok(chunk)) => state.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    state.done = true;
                    state.buffer.clear();
                    return Some((Err(EnvdError::Transport(e.to_string())), state));
                }
                None => state.done = true,
            }
        }
    })
    .boxed()
}
