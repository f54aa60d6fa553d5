pub mod commands;
pub mod files;
pub mod health;
pub mod pause;
pub mod pty;
pub mod sandboxes;
pub mod snapshots;
pub mod templates;
pub mod usage;
pub mod volumes;
pub mod writeback;

use axum::http::{header, HeaderMap};

/// The body length a request declares, if any (chunked bodies declare none):
/// enough to refuse an oversize upload before reading a byte of it.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
