//! Volumes API against the real binary, Postgres and Garage.

use crate::common::{self, garage, noise, sha256_hex, targz, ServerOptions, TestServer};
use reqwest::StatusCode;
use sandbox_blobs::{BlobStore, S3BlobStore};
use serde_json::Value;
use std::time::Duration;

fn garage_store(bucket_key: &str) -> S3BlobStore {
    common::s3_store(garage(), bucket_key)
}

/// Uploads an empty "probe" volume for the default owner; returns the
/// owner's id and the probe's blob key (which must survive what follows).
async fn probe_volume(server: &TestServer) -> (String, String) {
    let body: Value = server
        .post("/volumes?name=probe")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let field = |name: &str| body[name].as_str().unwrap().to_string();
    (field("owner_id"), field("blob_key"))
}

async fn assert_error(response: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("error bodies are JSON");
    body["message"]
        .as_str()
        .expect("error body has a message")
        .to_string()
}

/// Nothing of this owner in the bucket but the given keys, and no
/// unfinished multipart upload.
async fn assert_bucket_holds(owner: &str, expected: &[String]) {
    let store = garage_store("S3_BUCKET");
    let prefix = format!("owners/{owner}/");
    let mut keys = store.list_keys(&prefix).await.unwrap();
    keys.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(keys, expected);
    // Aborts from dropped uploads run in the background; give them a moment.
    for _ in 0..50 {
        if store.pending_uploads(&prefix).await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("unfinished multipart uploads left under {prefix}");
}

#[tokio::test]
async fn upload_get_list_download_delete() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    // 20 MiB of noise: a multipart upload of three parts.
    let big = noise(20 << 20, 7);
    let archive = targz(&[("data/rows.csv", b"a,b\n1,2\n".to_vec()), ("blob.bin", big)]);

    let response = server
        .post("/volumes?name=training-set")
        .header("content-type", "application/gzip")
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let volume: Value = response.json().await.unwrap();
    let id = volume["volume_id"].as_str().unwrap().to_string();
    let owner = volume["owner_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("vol-") && id.len() == 12, "{id}");
    assert_eq!(volume["name"], "training-set");
    assert_eq!(volume["size_bytes"], archive.len() as u64);
    assert_eq!(volume["sha256"], sha256_hex(&archive));
    assert_eq!(volume["entry_count"], 2);
    assert_eq!(volume["uncompressed_bytes"], (20 << 20) + 8);
    assert_eq!(volume["quota_bytes"], 0);
    assert_eq!(volume["backend"], "tarball");
    assert_eq!(
        volume["blob_key"],
        format!("owners/{owner}/volumes/{id}.tar.gz")
    );
    assert!(volume["created_at"].as_str().unwrap().ends_with('Z'));

    let fetched: Value = server
        .get(&format!("/volumes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, volume);

    let second: Value = server
        .post("/volumes?name=second")
        .body(targz(&[("x", b"x".to_vec())]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Value = server
        .get("/volumes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![second["volume_id"].as_str().unwrap(), id.as_str()],
        "newest first"
    );

    let download = server
        .get(&format!("/volumes/{id}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    let downloaded = download.bytes().await.unwrap();
    assert_eq!(downloaded.len(), archive.len());
    assert_eq!(
        sha256_hex(&downloaded),
        sha256_hex(&archive),
        "download returns the uploaded bytes"
    );

    let deleted = server
        .delete(&format!("/volumes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_error(
        server.get(&format!("/volumes/{id}")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_error(
        server
            .get(&format!("/volumes/{id}/download"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let again = server
        .delete(&format!("/volumes/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        StatusCode::NO_CONTENT,
        "deleting twice is fine"
    );
    assert_bucket_holds(&owner, &[second["blob_key"].as_str().unwrap().to_string()]).await;
}

#[tokio::test]
async fn chunked_and_empty_uploads() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let archive = targz(&[("a.txt", noise(9 << 20, 3))]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        archive.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .post("/volumes?name=chunked")
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let volume: Value = response.json().await.unwrap();
    assert_eq!(volume["size_bytes"], archive.len() as u64);
    assert_eq!(volume["sha256"], sha256_hex(&archive));
    let id = volume["volume_id"].as_str().unwrap();
    let download = server
        .get(&format!("/volumes/{id}/download"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&download), sha256_hex(&archive));

    // No body at all (what the Python SDK sends for data=None): an empty volume.
    let empty = server
        .post("/volumes?name=empty")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::CREATED);
    let empty: Value = empty.json().await.unwrap();
    assert_eq!(empty["size_bytes"], 0);
    assert_eq!(empty["entry_count"], 0);
}

#[tokio::test]
async fn bad_archives_are_rejected_and_leave_nothing() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let (owner, probe) = probe_volume(&server).await;

    // Not gzip at all.
    let message = assert_error(
        server
            .post("/volumes?name=plain")
            .body(b"just some text".to_vec())
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message.contains("gzip"), "{message}");

    // Valid gzip magic, then truncated after multipart parts went up.
    let mut truncated = targz(&[("big.bin", noise(24 << 20, 11))]);
    truncated.truncate(truncated.len() - 4096);
    let message = assert_error(
        server
            .post("/volumes?name=truncated")
            .body(truncated)
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message.contains("corrupt"), "{message}");

    // Gzip of something that is not a tar.
    let message = assert_error(
        server
            .post("/volumes?name=not-tar")
            .body(common::gzip(&noise(4096, 5)))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message.contains("corrupt"), "{message}");

    let listed: Value = server
        .get("/volumes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["volumes"].as_array().unwrap().len(),
        1,
        "only the probe volume exists"
    );
    assert_bucket_holds(&owner, &[probe]).await;
}

#[tokio::test]
async fn uploads_over_the_cap_get_413() {
    let _suite = common::suite(module_path!()).await;
    let server =
        TestServer::start(common::production().with_setting("volumes.max_upload_bytes", "1048576"))
            .await;
    let (owner, probe) = probe_volume(&server).await;
    let archive = targz(&[("big.bin", noise(3 << 20, 9))]);

    // Declared length over the cap: refused before reading.
    let message = assert_error(
        server
            .post("/volumes?name=big")
            .body(archive.clone())
            .send()
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(message.contains("1048576"), "{message}");

    // Chunked, so the cap is found while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        archive.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .post("/volumes?name=big-chunked")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    match response {
        Ok(response) => {
            assert_error(response, StatusCode::PAYLOAD_TOO_LARGE).await;
        }
        // The server may close the connection before the client finishes sending.
        Err(e) => eprintln!("client saw the connection close early: {e}"),
    }
    assert_bucket_holds(&owner, &[probe]).await;
    let health = server.get("/health").send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "server keeps serving");
}

#[tokio::test]
async fn authentication_and_owner_scoping() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let archive = targz(&[("secret.txt", b"alice's".to_vec())]);
    let volume: Value = server
        .post("/volumes?name=alice")
        .body(archive.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = volume["volume_id"].as_str().unwrap();

    // Missing and wrong keys.
    let anonymous = server
        .http
        .get(server.url("/volumes"))
        .send()
        .await
        .unwrap();
    let message = assert_error(anonymous, StatusCode::UNAUTHORIZED).await;
    assert_eq!(message, "unauthorized: missing or invalid API key");
    let wrong = server
        .http
        .get(server.url("/volumes"))
        .bearer_auth("sm_wrong")
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED).await;
    // X-API-Key is accepted too (the Python SDK's streaming calls use it).
    let via_header = server
        .http
        .get(server.url(&format!("/volumes/{id}")))
        .header("x-api-key", &server.api_key);
    assert_eq!(via_header.send().await.unwrap().status(), StatusCode::OK);

    // Another owner sees nothing of it and cannot delete it.
    let bob = server.create_key("bob");
    let as_bob = |req: reqwest::RequestBuilder| req.bearer_auth(&bob).send();
    let listed: Value = as_bob(server.http.get(server.url("/volumes")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, serde_json::json!({ "volumes": [] }));
    for path in [format!("/volumes/{id}"), format!("/volumes/{id}/download")] {
        assert_error(
            as_bob(server.http.get(server.url(&path))).await.unwrap(),
            StatusCode::NOT_FOUND,
        )
        .await;
    }
    assert_error(
        as_bob(server.http.delete(server.url(&format!("/volumes/{id}"))))
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let still_there = server
        .get(&format!("/volumes/{id}/download"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_hex(&still_there), sha256_hex(&archive));
}

#[tokio::test]
async fn interrupted_upload_leaves_no_row_and_no_upload() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let (owner, probe) = probe_volume(&server).await;

    // Send 20 MiB of a declared 64 MiB body, then hang up.
    let archive = targz(&[("big.bin", noise(64 << 20, 13))]);
    let sent = 20 << 20;
    let mut chunks: Vec<Result<Vec<u8>, std::io::Error>> = archive[..sent]
        .chunks(1 << 20)
        .map(|c| Ok(c.to_vec()))
        .collect();
    chunks.push(Err(std::io::Error::other("client gave up")));
    let result = server
        .post("/volumes?name=interrupted")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    assert!(result.is_err() || !result.unwrap().status().is_success());

    let listed: Value = server
        .get("/volumes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 1);
    assert_bucket_holds(&owner, &[probe]).await;
}

#[tokio::test]
async fn restart_aborts_uploads_a_crash_left_behind() {
    let _suite = common::suite(module_path!()).await;
    // Its own bucket, to count what is left under this owner exactly.
    let mut server = TestServer::start(ServerOptions {
        bucket: Some(garage()["S3_SWEEP_BUCKET"].clone()),
        ..common::production()
    })
    .await;
    let store = garage_store("S3_SWEEP_BUCKET");
    let (owner, _) = probe_volume(&server).await;

    // Start a 64 MiB upload, let a few parts land, then kill -9 the server.
    let archive = targz(&[("big.bin", noise(64 << 20, 17))]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let request = server
        .post("/volumes?name=crash")
        .header("content-length", archive.len())
        .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
        .send();
    let upload = tokio::spawn(request);
    for chunk in archive[..24 << 20].chunks(1 << 20) {
        tx.send(Ok(chunk.to_vec())).await.unwrap();
    }
    let prefix = format!("owners/{owner}/");
    for _ in 0..100 {
        if !store.pending_uploads(&prefix).await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !store.pending_uploads(&prefix).await.unwrap().is_empty(),
        "a multipart upload is in progress"
    );
    server.crash();
    drop(tx);
    let _ = upload.await;
    assert!(
        !store.pending_uploads(&prefix).await.unwrap().is_empty(),
        "the crash left it behind"
    );

    server.launch().await;
    assert!(
        store.pending_uploads(&prefix).await.unwrap().is_empty(),
        "start-up aborted it"
    );
    // Logged as the crashed upload's volume being removed (deleting its
    // key also ends Garage's multipart upload of it).
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    // The crashed upload's pending row went too: only the probe is listed,
    // and the bucket holds only the probe's blob.
    let listed: Value = server
        .get("/volumes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 1, "{listed}");
    assert!(
        log.contains("removed an unfinished upload's volume"),
        "logged"
    );
    assert_eq!(store.list_keys(&prefix).await.unwrap().len(), 1);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn health_and_metrics() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let health: Value = server
        .http
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"]["backend"], "postgres");
    assert!(health["blobs"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("s3://"));

    let archive = targz(&[("a", b"abc".to_vec())]);
    server
        .post("/volumes?name=m")
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    server
        .http
        .get(server.url("/volumes"))
        .send()
        .await
        .unwrap(); // a 401
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"http_requests_total{method="POST",route="/volumes",status="201"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"http_requests_total{method="GET",route="/volumes",status="401"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    let uploaded = metrics
        .lines()
        .find_map(|l| l.strip_prefix("volume_upload_bytes_total "))
        .expect("upload byte counter");
    assert_eq!(
        uploaded.trim().parse::<u64>().unwrap(),
        archive.len() as u64
    );

    // A request id comes back on every response.
    let response = server.get("/volumes").send().await.unwrap();
    assert!(response.headers().contains_key("x-request-id"));
}
