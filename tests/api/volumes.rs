//! Volumes API against the real binary, Postgres and Garage.

use crate::common::{
    self, garage, noise, sha256_hex, targz, Api, Reply, ServerOptions, TestServer,
};
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
    let body: Value = server.post("/volumes?name=probe").json_reply().await;
    let field = |name: &str| body[name].as_str().unwrap().to_string();
    (field("owner_id"), field("blob_key"))
}

/// Asserts an answer is `status` with an error body; returns its message.
fn assert_error((code, body): (StatusCode, Value), status: StatusCode) -> String {
    assert_eq!(code, status, "{body}");
    body["message"]
        .as_str()
        .expect("error bodies are JSON with a message")
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

    let (status, volume) = server.upload_volume("training-set", archive.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
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

    let fetched: Value = server.get_json(&format!("/volumes/{id}")).await;
    assert_eq!(fetched, volume);

    let (_, second) = server
        .upload_volume("second", targz(&[("x", b"x".to_vec())]))
        .await;
    let listed: Value = server.get_json("/volumes").await;
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

    let downloaded = server.download_volume(&id).await;
    assert_eq!(downloaded.len(), archive.len());
    assert_eq!(
        sha256_hex(&downloaded),
        sha256_hex(&archive),
        "download returns the uploaded bytes"
    );

    let (deleted, _) = server.delete(&format!("/volumes/{id}")).reply().await;
    assert_eq!(deleted, StatusCode::NO_CONTENT);
    for path in [format!("/volumes/{id}"), format!("/volumes/{id}/download")] {
        assert_error(server.get(&path).reply().await, StatusCode::NOT_FOUND);
    }
    let (again, _) = server.delete(&format!("/volumes/{id}")).reply().await;
    assert_eq!(again, StatusCode::NO_CONTENT, "deleting twice is fine");
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
    let download = server.download_volume(id).await;
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
            .upload_volume("plain", b"just some text".to_vec())
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert!(message.contains("gzip"), "{message}");

    // Valid gzip magic, then truncated after multipart parts went up.
    let mut truncated = targz(&[("big.bin", noise(24 << 20, 11))]);
    truncated.truncate(truncated.len() - 4096);
    let message = assert_error(
        server.upload_volume("truncated", truncated).await,
        StatusCode::BAD_REQUEST,
    );
    assert!(message.contains("corrupt"), "{message}");

    // Gzip of something that is not a tar.
    let message = assert_error(
        server
            .upload_volume("not-tar", common::gzip(&noise(4096, 5)))
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert!(message.contains("corrupt"), "{message}");

    assert_eq!(
        server.volume_count().await,
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
        server.upload_volume("big", archive.clone()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    assert!(message.contains("1048576"), "{message}");

    // Chunked, so the cap is found while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        archive.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let response = server
        .post("/volumes?name=big-chunked")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .try_reply()
        .await;
    match response {
        Ok(response) => {
            assert_error(response, StatusCode::PAYLOAD_TOO_LARGE);
        }
        // The server may close the connection before the client finishes sending.
        Err(e) => eprintln!("client saw the connection close early: {e}"),
    }
    assert_bucket_holds(&owner, &[probe]).await;
    let (health, _) = server.get("/health").reply().await;
    assert_eq!(health, StatusCode::OK, "server keeps serving");
}

#[tokio::test]
async fn authentication_and_owner_scoping() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let archive = targz(&[("secret.txt", b"alice's".to_vec())]);
    let (_, volume) = server.upload_volume("alice", archive.clone()).await;
    let id = volume["volume_id"].as_str().unwrap();

    // Missing and wrong keys.
    let anonymous = server.http.get(server.url("/volumes")).reply().await;
    let message = assert_error(anonymous, StatusCode::UNAUTHORIZED);
    assert_eq!(message, "unauthorized: missing or invalid API key");
    let wrong = server
        .http
        .get(server.url("/volumes"))
        .bearer_auth("sm_wrong");
    assert_error(wrong.reply().await, StatusCode::UNAUTHORIZED);
    // X-API-Key is accepted too (the Python SDK's streaming calls use it).
    let via_header = server
        .http
        .get(server.url(&format!("/volumes/{id}")))
        .header("x-api-key", &server.api_key);
    assert_eq!(via_header.send().await.unwrap().status(), StatusCode::OK);

    // Another owner sees nothing of it and cannot delete it.
    let bob = server.create_key("bob");
    let as_bob = |req: reqwest::RequestBuilder| req.bearer_auth(&bob);
    let listed = as_bob(server.http.get(server.url("/volumes")))
        .json_reply()
        .await;
    assert_eq!(listed, serde_json::json!({ "volumes": [] }));
    for path in [format!("/volumes/{id}"), format!("/volumes/{id}/download")] {
        let answer = as_bob(server.http.get(server.url(&path))).reply().await;
        assert_error(answer, StatusCode::NOT_FOUND);
    }
    let url = server.url(&format!("/volumes/{id}"));
    let answer = as_bob(server.http.delete(url)).reply().await;
    assert_error(answer, StatusCode::NOT_FOUND);
    let still_there = server.download_volume(id).await;
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

    assert_eq!(server.volume_count().await, 1);
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
    let (tx, upload) = common::streamed_upload(&server, "crash", archive.len());
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
    let listed: Value = server.get_json("/volumes").await;
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 1, "{listed}");
    assert!(
        log.contains("removed an unfinished upload's volume"),
        "logged"
    );
    assert_eq!(store.list_keys(&prefix).await.unwrap().len(), 1);
}

#[tokio::test]
async fn health_and_metrics() {
    let _suite = common::suite(module_path!()).await;
    let server = TestServer::start(common::production()).await;
    let health: Value = server.http.get(server.url("/health")).json_reply().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"]["backend"], "postgres");
    assert!(health["blobs"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("s3://"));

    let archive = targz(&[("a", b"abc".to_vec())]);
    server.upload_volume("m", archive.clone()).await;
    server
        .http
        .get(server.url("/volumes"))
        .send()
        .await
        .unwrap(); // a 401
    let metrics = server.metrics_text().await;
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
