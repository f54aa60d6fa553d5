//! Freezes the wire shapes of the current protocol version.
//!
//! Every request and response type is serialized from a fixed sample and
//! compared with `snapshots/v{PROTOCOL_VERSION}.json`; the snapshot is also
//! deserialized back, so a change that an older agent or host could not
//! read fails here. A deliberate, compatible change (e.g. a new optional
//! field) is recorded with `UPDATE_SNAPSHOTS=1 cargo test -p envd-protocol`;
//! an incompatible one needs a new `PROTOCOL_VERSION` and a new snapshot.

use std::collections::BTreeMap;

use envd_protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

fn sample<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    samples: &mut BTreeMap<String, Value>,
    name: &str,
    value: T,
) {
    let encoded = serde_json::to_value(&value).unwrap();
    let decoded: T = serde_json::from_value(encoded.clone()).unwrap();
    assert_eq!(decoded, value, "{name} does not round-trip");
    samples.insert(name.to_string(), encoded);
}

fn envs() -> BTreeMap<String, String> {
    BTreeMap::from([("LANG".to_string(), "C.UTF-8".to_string())])
}

fn current_samples() -> BTreeMap<String, Value> {
    let mut s = BTreeMap::new();
    sample(
        &mut s,
        "Health",
        Health {
            status: "ok".into(),
            protocol_version: 3,
            version: "0.1.0".into(),
            can_switch_users: true,
        },
    );
    sample(
        &mut s,
        "ErrorBody",
        ErrorBody {
            message: "/x: No such file".into(),
            code: error_code::NOT_FOUND.into(),
        },
    );
    let entry = EntryInfo {
        name: "a.txt".into(),
        path: "/home/user/a.txt".into(),
        file_type: FileType::File,
        size: 3,
        mode: 0o644,
        mtime: 1_700_000_000,
        is_symlink: false,
    };
    sample(&mut s, "EntryInfo", entry.clone());
    sample(
        &mut s,
        "EntryInfo.dir",
        EntryInfo {
            file_type: FileType::Dir,
            size: 0,
            ..entry
        },
    );
    sample(
        &mut s,
        "PathQuery",
        PathQuery {
            path: "/home/user/a.txt".into(),
            username: "user".into(),
        },
    );
    sample(
        &mut s,
        "ListQuery",
        ListQuery {
            path: "/home/user".into(),
            username: "user".into(),
            depth: 2,
        },
    );
    sample(
        &mut s,
        "WriteQuery",
        WriteQuery {
            path: "/a".into(),
            username: "user".into(),
            mode: Some(0o600),
        },
    );
    sample(
        &mut s,
        "WriteInfo",
        WriteInfo {
            path: "/a".into(),
            size: 10,
        },
    );
    sample(&mut s, "ExistsResponse", ExistsResponse { exists: true });
    sample(
        &mut s,
        "MkdirRequest",
        MkdirRequest {
            path: "/d".into(),
            username: "user".into(),
        },
    );
    sample(&mut s, "MkdirResponse", MkdirResponse { created: true });
    sample(
        &mut s,
        "BlockMountRequest",
        BlockMountRequest {
            serial: "slot0".into(),
            path: "/data".into(),
            size_bytes: 1 << 30,
            fresh: true,
            username: "user".into(),
        },
    );
    sample(
        &mut s,
        "BlockUnmountRequest",
        BlockUnmountRequest {
            path: "/data".into(),
        },
    );
    sample(
        &mut s,
        "RenameRequest",
        RenameRequest {
            old_path: "/a".into(),
            new_path: "/b".into(),
            username: "user".into(),
        },
    );
    sample(
        &mut s,
        "UnpackQuery",
        UnpackQuery {
            path: "/data".into(),
            username: "user".into(),
            max_bytes: None,
            max_entries: None,
            max_header_bytes: None,
            max_ratio: None,
        },
    );
    sample(
        &mut s,
        "UnpackReport",
        UnpackReport {
            files: 2,
            dirs: 1,
            bytes: 100,
            skipped: 1,
            skipped_entries: vec![SkippedEntry {
                name: "../x".into(),
                reason: "name contains ..".into(),
            }],
        },
    );
    sample(&mut s, "Empty", Empty {});
    sample(&mut s, "SetEnvRequest", SetEnvRequest { envs: envs() });
    sample(
        &mut s,
        "ProcessRequest",
        ProcessRequest {
            cmd: "echo hi".into(),
            user: "user".into(),
            cwd: Some("/tmp".into()),
            envs: envs(),
            timeout: Some(0),
            stdin: true,
        },
    );
    sample(
        &mut s,
        "RunResult",
        RunResult {
            stdout: "hi\n".into(),
            stderr: String::new(),
            exit_code: 124,
            timed_out: true,
            stdout_truncated: false,
            stderr_truncated: true,
        },
    );
    sample(&mut s, "StartedProcess", StartedProcess { pid: 42 });
    sample(
        &mut s,
        "ProcessInfo",
        ProcessInfo {
            pid: 42,
            cmd: "sleep 1".into(),
            envs: envs(),
            user: "user".into(),
            cwd: "/home/user".into(),
            running: true,
        },
    );
    sample(
        &mut s,
        "StdinRequest",
        StdinRequest {
            data: "aGk=".into(),
            base64: true,
        },
    );
    sample(&mut s, "KillResponse", KillResponse { killed: true });
    sample(
        &mut s,
        "ProcessEvent.start",
        ProcessEvent::Start { pid: 42 },
    );
    sample(
        &mut s,
        "ProcessEvent.stdout",
        ProcessEvent::Stdout {
            data: "out\n".into(),
        },
    );
    sample(
        &mut s,
        "ProcessEvent.stderr",
        ProcessEvent::Stderr {
            data: "err\n".into(),
        },
    );
    sample(&mut s, "ProcessEvent.keepalive", ProcessEvent::Keepalive);
    sample(
        &mut s,
        "PtyRequest",
        PtyRequest {
            user: "user".into(),
            cwd: Some("/home/user".into()),
            envs: envs(),
            size: PtySize { cols: 80, rows: 24 },
            timeout: Some(3600),
        },
    );
    sample(
        &mut s,
        "PtyEvent.data",
        PtyEvent::Data {
            data: "aGk=".into(),
        },
    );
    sample(&mut s, "PtyEvent.keepalive", PtyEvent::Keepalive);
    sample(&mut s, "PtyEvent.exit", PtyEvent::Exit { exit_code: 0 });
    sample(
        &mut s,
        "Usage",
        Usage {
            cpu_busy_usec: 1_500_000,
            cpu_count: 2,
            memory_used_bytes: 64 << 20,
            memory_total_bytes: 512 << 20,
            disk_used_bytes: 1 << 30,
            disk_total_bytes: 16 << 30,
        },
    );
    sample(
        &mut s,
        "InitRequest",
        InitRequest {
            token: "t0k3n".into(),
            unix_time_ns: Some(1_700_000_000_000_000_000),
            entropy: Some("AAECAw==".into()),
            hostname: Some("sbx-1".into()),
        },
    );
    sample(
        &mut s,
        "ProcessEvent.exit",
        ProcessEvent::Exit {
            exit_code: 0,
            timed_out: false,
        },
    );
    sample(
        &mut s,
        "ProcessEvent.error",
        ProcessEvent::Error {
            message: "boom".into(),
        },
    );
    s.insert(
        "routes".into(),
        json!([
            routes::HEALTH,
            routes::FILES,
            routes::FILES_LIST,
            routes::FILES_STAT,
            routes::FILES_EXISTS,
            routes::FILES_MKDIR,
            routes::FILES_RENAME,
            routes::FILES_UNPACK,
            routes::VOLUMES_BLOCK_MOUNT,
            routes::VOLUMES_BLOCK_UNMOUNT,
            routes::FILES_ARCHIVE,
            routes::USAGE,
            routes::PTY,
            routes::pty_stream(1),
            routes::pty_resize(1),
            routes::ENV,
            routes::PROCESSES,
            routes::PROCESSES_RUN,
            routes::PROCESSES_START,
            routes::PROCESSES_STREAM,
            routes::process_wait(1),
            routes::process_stdin(1),
            routes::process_close_stdin(1),
            routes::process(1)
        ]),
    );
    s
}

#[test]
fn wire_format_matches_the_frozen_snapshot() {
    let path = format!(
        "{}/tests/snapshots/v{PROTOCOL_VERSION}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let current = serde_json::to_value(current_samples()).unwrap();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&current).unwrap() + "\n",
        )
        .unwrap();
    }
    let frozen: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("missing snapshot {path}; run with UPDATE_SNAPSHOTS=1")),
    )
    .unwrap();
    assert_eq!(
        current, frozen,
        "the wire format of protocol v{PROTOCOL_VERSION} changed; if older peers can still read it, \
         record it with UPDATE_SNAPSHOTS=1, otherwise bump PROTOCOL_VERSION"
    );
}

/// Fields an older peer omits must still parse (defaults).
#[test]
fn minimal_bodies_from_older_peers_parse() {
    let request: ProcessRequest = serde_json::from_value(json!({"cmd": "ls"})).unwrap();
    assert_eq!(
        (request.user.as_str(), request.timeout, request.stdin),
        ("user", None, false)
    );
    let result: RunResult =
        serde_json::from_value(json!({"stdout": "", "stderr": "", "exit_code": 0})).unwrap();
    assert!(!result.timed_out);
    let health: Health =
        serde_json::from_value(json!({"status": "ok", "protocol_version": 1, "version": "0.1.0"}))
            .unwrap();
    assert!(health.can_switch_users);
    let list: ListQuery = serde_json::from_value(json!({"path": "/"})).unwrap();
    assert_eq!(list.depth, 1);
    assert!(is_compatible(1));
    assert!(!is_compatible(PROTOCOL_VERSION + 1));
}
