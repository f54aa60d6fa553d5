//! What a hostile client would send, each answered with the right status in
//! bounded time while `/health` keeps answering within a second and the
//! server's memory stays under a stated bound.

use crate::common::{self, *};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Server RSS ceiling through every abuse below (the server idles at
/// ~20 MiB; unbounded buffering of any of these inputs would pass it).
const RSS_BOUND_KIB: u64 = 256 * 1024;

/// `/health` answers within a second and memory is within bound.
async fn assert_responsive(server: &TestServer, after: &str) {
    let took = server.health_within(Duration::from_secs(1), after).await;
    assert!(took < Duration::from_secs(1));
    let rss = rss_kib(server.pid().unwrap());
    assert!(
        rss > 0 && rss < RSS_BOUND_KIB,
        "RSS {rss} KiB after {after}"
    );
}

/// An upload's answer and how long it took.
async fn upload(server: &TestServer, body: Vec<u8>) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let (status, body) = server.upload_volume("abuse", body).await;
    (status, body, started.elapsed())
}

#[tokio::test]
async fn hostile_archives_are_refused_quickly_naming_the_limit() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(embedded().with_setting("volumes.max_entries", "1000")).await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "sparse entry of 2^62 bytes",
            hostile::sparse_bomb(),
            "sparse",
        ),
        (
            "GNU long name claiming 4 GiB",
            hostile::oversized_record(b'L', 4 << 30),
            "longer than 65536",
        ),
        (
            "PAX header claiming 4 GiB",
            hostile::oversized_record(b'x', 4 << 30),
            "longer than 65536",
        ),
        (
            "1001 entries over a limit of 1000",
            hostile::many_entries(1001),
            "more than 1000 entries",
        ),
        (
            "entry declaring 2^40 bytes",
            hostile::oversized_record(b'0', 1 << 40),
            "more than 17179869184 bytes",
        ),
        ("256 MiB of zeros", hostile::zeros(256 << 20), "200:1"),
        (
            "truncated",
            {
                let mut a = targz(&[("a", noise(100_000, 1))]);
                a.truncate(a.len() / 2);
                a
            },
            "corrupt",
        ),
        ("gzip of garbage", gzip(&noise(10_000, 2)), "corrupt"),
        (
            "not gzip",
            b"PK\x03\x04 a zip file".to_vec(),
            "not a gzip archive",
        ),
    ];
    for (what, body, expected) in cases {
        let compressed = body.len();
        let (status, answer, took) = upload(&server, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{what}: {message:?} lacks {expected:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{what} ({compressed} bytes) took {took:?}"
        );
        assert_responsive(&server, what).await;
    }
    assert_eq!(server.volume_count().await, 0, "nothing refused was kept");

    // Concatenated gzip members are one valid archive, stored as what it
    // is whatever content type the client's defaults claimed (curl's).
    let (status, answer) = server
        .post("/volumes?name=members")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(hostile::concatenated_members())
        .reply()
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(answer["entry_count"], 2);
    assert_eq!(answer["content_type"], "application/gzip");
}

#[tokio::test]
async fn a_million_entries_pass_and_one_more_is_refused() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(embedded()).await;
    let (status, answer, _) = upload(&server, hostile::many_entries(1_000_000)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["entry_count"], 1_000_000);
    let (status, answer, _) = upload(&server, hostile::many_entries(1_000_001)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["message"]
        .as_str()
        .unwrap()
        .contains("more than 1000000 entries"));
    assert_responsive(&server, "a million entries").await;
}

#[tokio::test]
async fn hundreds_of_tiny_bombs_at_once_leave_the_server_serving() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(embedded()).await;
    let started = Instant::now();
    let uploads = (0..300).map(|_| upload(&server, hostile::sparse_bomb()));
    let answers = futures::future::join_all(uploads).await;
    // Each is refused: as a bad archive, or (past the per-owner concurrent
    // uploads) as over quota; none is stored, none fails the server.
    for (status, body, _) in &answers {
        assert!(
            *status == StatusCode::BAD_REQUEST || *status == StatusCode::TOO_MANY_REQUESTS,
            "{status}: {body}"
        );
    }
    assert!(answers
        .iter()
        .any(|(status, _, _)| *status == StatusCode::BAD_REQUEST));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_responsive(&server, "300 concurrent sparse bombs").await;
    // The blocking pool is free: a real upload goes through at once.
    let (status, _, took) = upload(&server, targz(&[("ok.txt", b"fine".to_vec())])).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(took < Duration::from_secs(5));
}

/// Raw TCP, for clients no HTTP library would be.
fn connect(server: &TestServer) -> TcpStream {
    let address = server.base_url.trim_start_matches("http://");
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads until the peer closes; returns what came and how long it took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection still open after {:?}: {e}", started.elapsed()),
        }
    }
    (
        String::from_utf8_lossy(&seen).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(
        embedded()
            .with_setting("http.header_read_timeout_secs", "2")
            .with_setting("http.idle_timeout_secs", "30")
            .with_setting("http.body_chunk_timeout_secs", "2"),
    )
    .await;
    let key = server.api_key.clone();

    // Slowloris: headers trickled a byte at a time, each well inside the
    // idle timeout, never finished; and a connection that sends nothing.
    let mut slow = connect(&server);
    let trickle = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if slow.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(250));
            assert!(started.elapsed() < Duration::from_secs(15), "still open");
        }
        unreachable!()
    });
    let mut silent = connect(&server);
    let (_, silent_took) = tokio::task::spawn_blocking(move || read_until_closed(&mut silent))
        .await
        .unwrap();
    let took = trickle.await.unwrap();
    for (what, took) in [("trickled headers", took), ("silence", silent_took)] {
        assert!(
            took < Duration::from_secs(6),
            "{what} held the connection {took:?} (header deadline 2 s, idle 30 s)"
        );
    }
    assert_responsive(&server, "slow headers").await;

    // A kept-alive connection waiting for its next request is not a slow
    // header: it is still usable well past the header deadline.
    let mut kept = connect(&server);
    let mut buf = [0u8; 4096];
    for round in 0..2 {
        kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let n = kept.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
    }

    // An upload that stops sending: 408, and nothing is kept.
    let mut stalled = connect(&server);
    let head = format!(
        "POST /volumes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/gzip\r\nContent-Length: 100000\r\n\r\n"
    );
    stalled.write_all(head.as_bytes()).unwrap();
    stalled
        .write_all(&targz(&[("a", noise(50_000, 3))])[..1000])
        .unwrap();
    let (seen, took) = tokio::task::spawn_blocking(move || read_until_closed(&mut stalled))
        .await
        .unwrap();
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("stopped sending"), "{seen}");
    assert!(took < Duration::from_secs(10));
    assert_eq!(server.volume_count().await, 0);
}

#[tokio::test]
async fn connections_past_the_cap_wait_for_a_slot() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(
        embedded()
            .with_setting("http.max_connections", "4")
            .with_setting("http.idle_timeout_secs", "2")
            .with_setting("http.header_read_timeout_secs", "30"),
    )
    .await;
    // An idle kept-alive connection is closed after the idle timeout.
    let mut idle = connect(&server);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (seen, took) = tokio::task::spawn_blocking(move || read_until_closed(&mut idle))
        .await
        .unwrap();
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "idle connection closed after {took:?} (idle timeout 2 s)"
    );

    let hogs: Vec<TcpStream> = (0..4).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(server.url("/health"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("served once the idle hogs are closed");
    assert!(response.status().is_success());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "served at once ({waited:?}): the cap did not hold"
    );
    drop(hogs);
}

#[tokio::test]
async fn list_and_body_inputs_are_bounded() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(
        embedded()
            .with_setting("http.max_json_body_bytes", "65536")
            .with_setting("http.max_list_items", "100"),
    )
    .await;
    let ids: Vec<String> = (0..101).map(|i| format!("sbx-{i}")).collect();
    let (status, body) = server
        .post("/sandboxes/kill-many")
        .json(&json!({ "sandbox_ids": ids }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["message"].as_str().unwrap().contains("at most 100"));

    let volumes: Vec<Value> = (0..17)
        .map(|i| json!({ "volume_id": "vol-1", "mount_path": format!("/d{i}") }))
        .collect();
    let (status, body) = server.create_sandbox(json!({ "volumes": volumes })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 16 volumes"),
        "{body}"
    );

    let (status, _) = server
        .create_sandbox(json!({ "metadata": { "k": "v".repeat(70_000) } }))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Client-chosen methods never become metric labels.
    let odd = reqwest::Method::from_bytes(b"BREWCOFFEE").unwrap();
    let _ = server
        .http
        .request(odd, server.url("/health"))
        .send()
        .await
        .unwrap();
    let metrics = server.metrics_text().await;
    assert!(!metrics.contains("BREWCOFFEE"));
    assert!(metrics.contains("method=\"other\""));
    assert_responsive(&server, "oversize inputs").await;
}

#[tokio::test]
async fn owner_quotas_refuse_past_the_limit_and_overrides_lift_them() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(embedded().with_setting("quotas.max_volumes", "2")).await;
    let archive = targz(&[("a.txt", b"a".to_vec())]);
    for _ in 0..2 {
        assert_eq!(
            upload(&server, archive.clone()).await.0,
            StatusCode::CREATED
        );
    }
    let (status, body, _) = upload(&server, archive.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 volumes"),
        "{body}"
    );

    let out = set_quotas(&server, &["--volumes", "3"]);
    assert!(out.contains("volumes\t2 of 3"), "{out}");
    assert_eq!(
        upload(&server, archive.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        upload(&server, archive).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // The stored-bytes quota bounds the upload itself.
    let big = targz(&[("n", noise(200_000, 4))]);
    set_quotas(&server, &["--volumes=-1", "--volume-bytes=100000"]);
    let (status, body, _) = upload(&server, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
}

/// `sandbox-manager quotas set` for owner `default`; asserts it succeeds
/// and returns what it printed.
fn set_quotas(server: &TestServer, settings: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .args(["quotas", "set", "--owner", "default"])
        .args(settings)
        .arg("--config")
        .arg(&server.config_path)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn data_dir_database_blobs_and_key_are_private() {
    let _suite = common::suite(module_path!()).await;
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(embedded()).await;
    assert_eq!(
        upload(&server, targz(&[("a", b"a".to_vec())])).await.0,
        StatusCode::CREATED
    );
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = server.data_dir.path();
    assert_eq!(
        mode(data) & 0o077,
        0o011,
        "data dir lists or reads for others"
    );
    assert_eq!(mode(&data.join("sandbox-manager.db")), 0o600);
    assert_eq!(mode(&data.join("api-key")), 0o600);
    assert_eq!(mode(&data.join("blobs")), 0o700);
    let blob = files_under(&data.join("blobs")).pop().expect("a blob");
    assert_eq!(mode(&blob), 0o600, "{}", blob.display());
    // The key is printed once, never logged.
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains(&server.api_key));
}
