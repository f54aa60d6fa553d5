//! Volume attachments in a create request, parsed and checked at the edge
//! (as the Declaw SDKs send them): every accepted `mount_path` is absolute, normalised,
//! not `/`, not inside a system directory, and no two overlap.

use crate::error::ApiError;
use sandbox_orchestrator::Attachment;
use serde::Deserialize;

const SYSTEM_DIRS: [&str; 12] = [
    "/etc", "/usr", "/proc", "/sys", "/dev", "/bin", "/sbin", "/lib", "/lib64", "/var", "/run",
    "/boot",
];

/// One entry of a create's `volumes`: a private copy of the volume under
/// `mount_path` (absolute, not `/`, not in a system directory).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct RawAttachment {
    volume_id: String,
    mount_path: String,
    /// Only `rw` (the default) is supported.
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    subpath: Option<String>,
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// `/data//x/` → `/data/x`; `.` and `..` components are refused rather
/// than resolved, so what the caller wrote is what they get.
fn normalise_mount_path(raw: &str) -> Result<String, ApiError> {
    if !raw.starts_with('/') {
        return Err(bad(format!("mount_path {raw:?} must be an absolute path")));
    }
    let mut parts = Vec::new();
    for part in raw.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(bad(format!(
                "mount_path {raw:?} must not contain '.' or '..'"
            )));
        }
        if part.contains('\0') {
            return Err(bad("mount_path must not contain NUL".into()));
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return Err(bad("mount_path must not be /".into()));
    }
    let path = format!("/{}", parts.join("/"));
    if let Some(system) = SYSTEM_DIRS.iter().find(|dir| within(&path, dir)) {
        return Err(bad(format!(
            "mount_path {path:?} is inside the system directory {system}"
        )));
    }
    Ok(path)
}

/// Whether `path` is `dir` or below it (component-wise).
fn within(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Longest accepted mount path (PATH_MAX) and volume id.
const MAX_MOUNT_PATH: usize = 4096;
const MAX_VOLUME_ID: usize = 128;

/// `max`: most attachments one create may carry (checked before anything
/// else, so the overlap check below stays small).
pub fn parse(value: Option<serde_json::Value>, max: usize) -> Result<Vec<Attachment>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let raw: Vec<RawAttachment> = serde_json::from_value(value).map_err(|e| {
        bad(format!(
            "volumes must be a list of {{volume_id, mount_path}}: {e}"
        ))
    })?;
    if raw.len() > max {
        return Err(bad(format!(
            "a sandbox takes at most {max} volumes, got {}",
            raw.len()
        )));
    }
    let mut attachments: Vec<Attachment> = Vec::with_capacity(raw.len());
    for item in raw {
        if item.mount_path.len() > MAX_MOUNT_PATH || item.volume_id.len() > MAX_VOLUME_ID {
            return Err(bad(format!(
                "mount_path is limited to {MAX_MOUNT_PATH} bytes and volume_id to {MAX_VOLUME_ID}"
            )));
        }
        match item.mode.as_deref().unwrap_or("copy") {
            "copy" => {}
            "mount" | "mount-ro" => {
                return Err(bad(format!(
                    "volume {}: live mounts (mode {:?}) are not supported yet; use mode \"copy\"",
                    item.volume_id,
                    item.mode.unwrap_or_default()
                )))
            }
            other => {
                return Err(bad(format!(
                    "volume {}: unknown mode {other:?}",
                    item.volume_id
                )))
            }
        }
        if item.subpath.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(bad(format!(
                "volume {}: subpath is only valid for live mounts",
                item.volume_id
            )));
        }
        if item.volume_id.is_empty() {
            return Err(bad("volume_id must not be empty".into()));
        }
        let mount_path = normalise_mount_path(&item.mount_path)?;
        if let Some(other) = attachments
            .iter()
            .find(|a| within(&a.mount_path, &mount_path) || within(&mount_path, &a.mount_path))
        {
            return Err(bad(format!(
                "mount paths {} and {mount_path} overlap",
                other.mount_path
            )));
        }
        attachments.push(Attachment {
            volume_id: item.volume_id,
            mount_path,
        });
    }
    Ok(attachments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(mount_path: &str) -> Result<Vec<Attachment>, ApiError> {
        parse(
            Some(json!([{ "volume_id": "vol-1", "mount_path": mount_path }])),
            16,
        )
    }

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(one("/data").unwrap()[0].mount_path, "/data");
        assert_eq!(one("//data//set/").unwrap()[0].mount_path, "/data/set");
        assert_eq!(one("/etcetera").unwrap()[0].mount_path, "/etcetera");
        assert_eq!(
            one("/home/user/data").unwrap()[0].mount_path,
            "/home/user/data"
        );
    }

    #[test]
    fn refuses_bad_paths() {
        for path in [
            "data",
            "/",
            "//",
            "/etc",
            "/etc/app",
            "/usr/local/x",
            "/proc",
            "/data/../etc",
            "/./x",
            "",
        ] {
            assert!(one(path).is_err(), "{path:?} accepted");
        }
    }

    #[test]
    fn refuses_overlap_modes_and_subpaths() {
        let overlapping = json!([
            { "volume_id": "a", "mount_path": "/data" },
            { "volume_id": "b", "mount_path": "/data/inner" }
        ]);
        assert!(parse(Some(overlapping), 16).is_err());
        let siblings = json!([
            { "volume_id": "a", "mount_path": "/data" },
            { "volume_id": "b", "mount_path": "/database" }
        ]);
        assert_eq!(parse(Some(siblings), 16).unwrap().len(), 2);
        let live = json!([{ "volume_id": "a", "mount_path": "/data", "mode": "mount" }]);
        assert!(parse(Some(live), 16)
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        let subpath = json!([{ "volume_id": "a", "mount_path": "/data", "subpath": "x" }]);
        assert!(parse(Some(subpath), 16).is_err());
        assert!(parse(None, 16).unwrap().is_empty());
        let many: Vec<_> = (0..17)
            .map(|i| json!({ "volume_id": "a", "mount_path": format!("/d{i}") }))
            .collect();
        assert!(parse(Some(json!(many)), 16)
            .unwrap_err()
            .to_string()
            .contains("at most 16"));
    }
}
