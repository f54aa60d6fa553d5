//! File API through the real binary and the envd-protocol client.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use bytes::Bytes;
use common::{is_root, Envd, USER_UID};
use envd_protocol::client::{EnvdClient, Target};
use envd_protocol::FileType;
use futures::StreamExt;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn health_and_token() {
    let envd = Envd::start().await;
    let health = envd.client.health().await.unwrap();
    assert_eq!(health.status, "ok");
    assert_eq!(health.protocol_version, envd_protocol::PROTOCOL_VERSION);
    assert_eq!(health.can_switch_users, is_root());

    let intruder = EnvdClient::unix(&envd.socket, "wrong-token");
    let error = intruder.exists("/etc/passwd", "user").await.unwrap_err();
    assert_eq!(error.status(), Some(401));
    assert_eq!(error.code(), Some("unauthorized"));
}

#[tokio::test]
async fn small_file_operations() {
    let envd = Envd::start().await;
    let client = &envd.client;

    let info = client
        .write_bytes("/home/user/a/b/hello.txt", "user", "hello world")
        .await
        .unwrap();
    assert_eq!(info.path, "/home/user/a/b/hello.txt");
    assert_eq!(info.size, 11);
    assert_eq!(
        client
            .read_to_bytes("/home/user/a/b/hello.txt", "user")
            .await
            .unwrap(),
        "hello world"
    );
    assert_eq!(
        std::fs::read(envd.host("/home/user/a/b/hello.txt")).unwrap(),
        b"hello world"
    );
    if is_root() {
        let meta = std::fs::metadata(envd.host("/home/user/a/b/hello.txt")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (USER_UID, USER_UID));
        let parent = std::fs::metadata(envd.host("/home/user/a")).unwrap();
        assert_eq!(parent.uid(), USER_UID, "created parents belong to the user");
    }

    // Overwrite with a mode; setuid is dropped.
    let body = futures::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from_static(
        b"#!/bin/sh\n",
    ))]);
    client
        .write_file("/home/user/run.sh", "user", Some(0o4755), body)
        .await
        .unwrap();
    let stat = client.stat("/home/user/run.sh", "user").await.unwrap();
    assert_eq!(stat.mode, 0o755);
    assert_eq!(stat.file_type, FileType::File);
    assert_eq!(stat.name, "run.sh");
    assert_eq!(stat.size, 10);
    assert!(stat.mtime > 1_600_000_000);

    assert!(client.exists("/home/user/a", "user").await.unwrap());
    assert!(!client.exists("/home/user/missing", "user").await.unwrap());
    assert!(!client
        .exists("/home/user/run.sh/below", "user")
        .await
        .unwrap());

    assert!(client.mkdir("/home/user/x/y/z", "user").await.unwrap());
    assert!(!client.mkdir("/home/user/x/y/z", "user").await.unwrap());
    let conflict = client.mkdir("/home/user/run.sh", "user").await.unwrap_err();
    assert_eq!(conflict.status(), Some(409));

    let shallow = client.list("/home/user", "user", 1).await.unwrap();
    let names: Vec<_> = shallow.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "run.sh", "x"]);
    assert_eq!(shallow[0].file_type, FileType::Dir);
    assert_eq!(shallow[0].size, 0);
    let deep = client.list("/home/user", "user", 2).await.unwrap();
    let paths: Vec<_> = deep.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/home/user/a",
            "/home/user/a/b",
            "/home/user/run.sh",
            "/home/user/x",
            "/home/user/x/y"
        ]
    );

    let renamed = client
        .rename("/home/user/a/b/hello.txt", "/home/user/hi.txt", "user")
        .await
        .unwrap();
    assert_eq!(renamed.path, "/home/user/hi.txt");
    assert_eq!(renamed.size, 11);

    client.remove("/home/user/x", "user").await.unwrap();
    assert!(!envd.host("/home/user/x").exists());

    let missing = client
        .read_to_bytes("/home/user/nope", "user")
        .await
        .unwrap_err();
    assert_eq!(missing.status(), Some(404));
    assert_eq!(missing.code(), Some("not_found"));
    let is_dir = client
        .read_to_bytes("/home/user/a", "user")
        .await
        .unwrap_err();
    assert_eq!(is_dir.status(), Some(400));
    let unknown = client
        .write_bytes("/tmp/f", "nobody", "x")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some("unknown_user"));
    let root_remove = client.remove("/", "root").await.unwrap_err();
    assert_eq!(root_remove.status(), Some(400));
}

/// Deterministic pseudo-random chunk `index` (xorshift), so neither side
/// ever holds the whole file.
fn chunk(index: u64, size: usize) -> Bytes {
    let mut state = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size);
    while out.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn large_file_round_trip_is_streamed() {
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: u64 = 256; // 256 MiB
    let envd = Envd::start().await;

    let mut expected = Sha256::new();
    for index in 0..CHUNKS {
        expected.update(chunk(index, CHUNK));
    }
    let expected = expected.finalize();

    let body =
        futures::stream::iter(0..CHUNKS).map(|index| Ok::<_, std::io::Error>(chunk(index, CHUNK)));
    let info = envd
        .client
        .write_file("/home/user/big.bin", "user", None, body)
        .await
        .unwrap();
    assert_eq!(info.size, CHUNKS * CHUNK as u64);

    let mut stream = envd
        .client
        .read_file("/home/user/big.bin", "user")
        .await
        .unwrap();
    let mut actual = Sha256::new();
    let mut total = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        total += piece.len() as u64;
        actual.update(&piece);
    }
    assert_eq!(total, info.size);
    assert_eq!(actual.finalize(), expected);

    let peak_mib = vm_hwm_kib(envd.pid()) / 1024;
    assert!(
        peak_mib < 128,
        "envd peak RSS {peak_mib} MiB: files are buffered"
    );
}

#[tokio::test]
async fn planted_symlinks_cannot_escape_the_root() {
    let envd = Envd::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "outside secret").unwrap();
    let outside_path = outside.path().to_str().unwrap().to_string();
    // Planted by "a process in the sandbox": absolute and relative escapes.
    std::os::unix::fs::symlink(&outside_path, envd.host("/home/user/abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../../..", envd.host("/home/user/rel")).unwrap();
    std::os::unix::fs::symlink(
        format!("{outside_path}/secret"),
        envd.host("/home/user/file-link"),
    )
    .unwrap();
    let client = &envd.client;

    // Reading through the links never reaches the outside file.
    assert_eq!(
        client
            .read_to_bytes("/home/user/abs/secret", "user")
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(
        client
            .read_to_bytes("/home/user/file-link", "user")
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(
        client
            .read_to_bytes("/home/user/rel/etc/group", "user")
            .await
            .unwrap(),
        std::fs::read(envd.host("/etc/group")).unwrap()
    );
    assert_eq!(
        client
            .read_to_bytes("/../../../etc/group", "user")
            .await
            .unwrap(),
        std::fs::read(envd.host("/etc/group")).unwrap()
    );

    // Writing through them lands inside the root.
    client
        .write_bytes("/home/user/abs/new.txt", "user", "x")
        .await
        .unwrap();
    client
        .write_bytes("/home/user/file-link", "user", "overwritten")
        .await
        .unwrap();
    client
        .write_bytes("/home/user/rel/tmp/via-rel.txt", "user", "y")
        .await
        .unwrap();
    client.mkdir("/home/user/abs/made", "user").await.unwrap();
    assert!(envd.host(&format!("{outside_path}/new.txt")).exists());
    assert!(envd.host(&format!("{outside_path}/secret")).exists());
    assert!(envd.host("/tmp/via-rel.txt").exists());

    // Remove and rename act on the link itself.
    client
        .rename("/home/user/abs", "/home/user/abs2", "user")
        .await
        .unwrap();
    client.remove("/home/user/abs2", "user").await.unwrap();

    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["secret"], "nothing written outside the root");
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).unwrap(),
        "outside secret"
    );
}

#[tokio::test]
async fn http2_client_works() {
    let envd = Envd::start().await;
    let client = EnvdClient::builder(Target::Unix(envd.socket.clone()), common::TOKEN)
        .http2(true)
        .build();
    client
        .write_bytes("/tmp/h2.txt", "root", "over h2")
        .await
        .unwrap();
    let results =
        futures::future::join_all((0..8).map(|_| client.read_to_bytes("/tmp/h2.txt", "root")))
            .await;
    for result in results {
        assert_eq!(result.unwrap(), "over h2");
    }
    let mode = std::fs::metadata(envd.host("/tmp/h2.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}
