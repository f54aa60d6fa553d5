//! Streamed unpack through the real binary: normal and hostile archives.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use bytes::Bytes;
use common::{is_root, Envd, USER_UID};
use tar::{EntryType, Header};

fn body(
    data: Vec<u8>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    // Small chunks exercise the parser across chunk boundaries.
    let chunks: Vec<_> = data
        .chunks(7919)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures::stream::iter(chunks)
}

fn file_header(name: &str, size: usize, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(EntryType::Regular);
    header.set_size(size as u64);
    header.set_mode(mode);
    set_raw_name(&mut header, name);
    header
}

/// Writes the name bytes directly: the tar crate refuses `..` in `set_path`,
/// which is exactly what a hostile archive contains.
fn set_raw_name(header: &mut Header, name: &str) {
    let field = &mut header.as_old_mut().name;
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
    header.set_cksum();
}

fn special_header(name: &str, kind: EntryType, link: Option<&str>) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(0);
    header.set_mode(0o644);
    if let Some(link) = link {
        header.set_link_name(link).unwrap();
    }
    set_raw_name(&mut header, name);
    header
}

#[tokio::test]
async fn unpacks_a_normal_archive_plain_and_gzipped() {
    let envd = Envd::start().await;
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = Header::new_gnu();
    dir.set_entry_type(EntryType::Directory);
    dir.set_size(0);
    dir.set_mode(0o750);
    set_raw_name(&mut dir, "./project/");
    builder.append(&dir, std::io::empty()).unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    builder
        .append(
            &file_header("./project/big.bin", big.len(), 0o644),
            &big[..],
        )
        .unwrap();
    builder
        .append(&file_header("project/bin/tool", 5, 0o4755), &b"tool\n"[..])
        .unwrap();
    builder
        .append(
            &file_header("project/deep/er/still/file.txt", 2, 0o600),
            &b"hi"[..],
        )
        .unwrap();
    let archive = builder.into_inner().unwrap();

    let report = envd
        .client
        .unpack("/home/user/data", "user", body(archive.clone()), false)
        .await
        .unwrap();
    assert_eq!(report.files, 3);
    assert_eq!(report.bytes, big.len() as u64 + 7);
    assert_eq!(report.skipped, 0, "{:?}", report.skipped_entries);
    assert_eq!(
        report.dirs, 5,
        "project, bin, deep, er, still (the destination itself is not counted)"
    );
    assert_eq!(
        std::fs::read(envd.host("/home/user/data/project/big.bin")).unwrap(),
        big
    );
    let tool = std::fs::metadata(envd.host("/home/user/data/project/bin/tool")).unwrap();
    assert_eq!(tool.permissions().mode() & 0o7777, 0o755, "setuid dropped");
    let project = std::fs::metadata(envd.host("/home/user/data/project")).unwrap();
    assert_eq!(project.permissions().mode() & 0o777, 0o750);
    if is_root() {
        assert_eq!((tool.uid(), tool.gid()), (USER_UID, USER_UID));
        assert_eq!(project.uid(), USER_UID);
    }

    // Same archive gzipped, over the top: existing files are overwritten.
    std::fs::write(
        envd.host("/home/user/data/project/bin/tool"),
        "old content that is longer",
    )
    .unwrap();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&archive).unwrap();
    let report = envd
        .client
        .unpack(
            "/home/user/data",
            "user",
            body(gzip.finish().unwrap()),
            true,
        )
        .await
        .unwrap();
    assert_eq!((report.files, report.dirs, report.skipped), (3, 0, 0));
    assert_eq!(
        std::fs::read(envd.host("/home/user/data/project/bin/tool")).unwrap(),
        b"tool\n"
    );

    // A truncated archive is an error, not a silent partial success.
    let mut broken = tar::Builder::new(Vec::new());
    broken
        .append(
            &file_header("x.bin", 100_000, 0o644),
            &vec![1u8; 100_000][..],
        )
        .unwrap();
    let mut broken = broken.into_inner().unwrap();
    broken.truncate(50_000);
    let error = envd
        .client
        .unpack("/home/user/broken", "user", body(broken), false)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(400), "{error}");
}

#[tokio::test]
async fn hostile_archive_writes_nothing_outside_the_destination() {
    let envd = Envd::start().await;
    let outside = tempfile::tempdir().unwrap();
    let outside_file = outside.path().join("victim.txt");
    std::fs::write(&outside_file, "untouched").unwrap();
    let outside_path = outside.path().to_str().unwrap().to_string();
    // A symlink planted in the destination by a sandbox process.
    std::fs::create_dir_all(envd.host("/home/user/dest")).unwrap();
    std::os::unix::fs::symlink(&outside_path, envd.host("/home/user/dest/planted")).unwrap();

    let mut builder = tar::Builder::new(Vec::new());
    let entries: Vec<(Header, &[u8])> = vec![
        (file_header("../escape.txt", 4, 0o644), b"evil"),
        (file_header("a/../../escape2.txt", 4, 0o644), b"evil"),
        (file_header("/abs/file.txt", 4, 0o644), b"safe"),
        (
            special_header("link", EntryType::Symlink, Some(&outside_path)),
            b"",
        ),
        (file_header("link/through-link.txt", 4, 0o644), b"safe"),
        (
            special_header(
                "hard",
                EntryType::Link,
                Some(outside_file.to_str().unwrap()),
            ),
            b"",
        ),
        (special_header("dev", EntryType::Char, None), b""),
        (special_header("blk", EntryType::Block, None), b""),
        (special_header("fifo", EntryType::Fifo, None), b""),
        (file_header("planted/via-planted.txt", 4, 0o644), b"evil"),
        (file_header("ok.txt", 2, 0o644), b"ok"),
    ];
    for (header, data) in entries {
        builder.append(&header, data).unwrap();
    }
    let archive = builder.into_inner().unwrap();
    let report = envd
        .client
        .unpack("/home/user/dest", "user", body(archive), false)
        .await
        .unwrap();

    let skipped: Vec<(&str, &str)> = report
        .skipped_entries
        .iter()
        .map(|s| (s.name.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(report.skipped, 8, "{skipped:?}");
    assert_eq!(
        report.files, 3,
        "abs/file.txt, link/through-link.txt, ok.txt: {skipped:?}"
    );
    for name in [
        "../escape.txt",
        "a/../../escape2.txt",
        "link",
        "hard",
        "dev",
        "blk",
        "fifo",
        "planted/via-planted.txt",
    ] {
        assert!(
            skipped.iter().any(|(n, _)| *n == name),
            "{name} not skipped: {skipped:?}"
        );
    }
    let dest = envd.host("/home/user/dest");
    assert_eq!(std::fs::read(dest.join("abs/file.txt")).unwrap(), b"safe");
    assert!(dest.join("link").is_dir() && !dest.join("link").is_symlink());
    assert_eq!(
        std::fs::read(dest.join("link/through-link.txt")).unwrap(),
        b"safe"
    );
    assert!(!envd.host("/home/user/escape.txt").exists());
    assert!(!envd.host("/home/escape2.txt").exists());
    for name in ["dev", "blk", "fifo", "hard"] {
        assert!(!dest.join(name).exists(), "{name} was created");
    }
    let outside_names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside_names, ["victim.txt"], "nothing written outside");
    assert_eq!(std::fs::read_to_string(&outside_file).unwrap(), "untouched");
}

#[tokio::test]
async fn destination_through_a_planted_symlink_stays_in_the_root() {
    let envd = Envd::start().await;
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), envd.host("/home/user/vol")).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append(&file_header("f.txt", 1, 0o644), &b"x"[..])
        .unwrap();
    let report = envd
        .client
        .unpack(
            "/home/user/vol",
            "user",
            body(builder.into_inner().unwrap()),
            false,
        )
        .await
        .unwrap();
    assert_eq!(report.files, 1);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    let inside = envd.host(&format!("{}/f.txt", outside.path().display()));
    assert!(
        inside.exists(),
        "resolved inside the root at {}",
        inside.display()
    );
}

fn gzipped(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// An archive of one header that lies about what follows it.
fn lying_header(kind: EntryType, size: u64) -> Vec<u8> {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    set_raw_name(&mut header, "liar");
    let mut archive = header.as_bytes().to_vec();
    archive.extend_from_slice(&[0u8; 4096]);
    archive
}

#[tokio::test]
async fn bombs_and_limits_fail_the_unpack_quickly_naming_why() {
    let envd = Envd::start().await;
    let cases = [
        (
            "sparse",
            lying_header(EntryType::GNUSparse, 1 << 62),
            "sparse",
        ),
        (
            "long name",
            lying_header(EntryType::GNULongName, 4 << 30),
            "longer than",
        ),
        (
            "pax",
            lying_header(EntryType::XHeader, 4 << 30),
            "longer than",
        ),
        (
            "huge entry",
            lying_header(EntryType::Regular, 1 << 40),
            "more than",
        ),
    ];
    for (what, archive, expected) in cases {
        let started = std::time::Instant::now();
        let error = envd
            .client
            .unpack("/home/user/bomb", "user", body(gzipped(&archive)), true)
            .await
            .unwrap_err();
        assert_eq!(error.status(), Some(400), "{what}: {error}");
        assert!(error.to_string().contains(expected), "{what}: {error}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{what}"
        );
    }
    // The caller's limits apply.
    let limits = |max_bytes, max_entries| envd_protocol::UnpackLimits {
        max_bytes,
        max_entries,
        max_header_bytes: None,
        max_ratio: None,
    };
    let mut builder = tar::Builder::new(Vec::new());
    for i in 0..6 {
        builder
            .append(&file_header(&format!("f{i}"), 1, 0o644), &b"x"[..])
            .unwrap();
    }
    let archive = builder.into_inner().unwrap();
    let error = envd
        .client
        .unpack_limited(
            "/home/user/many",
            "user",
            body(archive.clone()),
            false,
            limits(None, Some(5)),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("more than 5 entries"), "{error}");
    let error = envd
        .client
        .unpack_limited(
            "/home/user/big",
            "user",
            body(archive.clone()),
            false,
            limits(Some(5), None),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("more than 5 bytes"), "{error}");
    let report = envd
        .client
        .unpack_limited(
            "/home/user/ok",
            "user",
            body(archive),
            false,
            limits(Some(6), Some(6)),
        )
        .await
        .unwrap();
    assert_eq!(report.files, 6);
}
