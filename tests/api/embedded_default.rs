//! The embedded default: no database URL, no S3, just a data_dir.

use crate::common::{self, targz, TestServer};
use reqwest::StatusCode;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;

#[tokio::test]
async fn first_start_creates_a_key_and_volumes_work() {
    let _suite = common::suite(module_path!()).await;
    let mut server = TestServer::start(common::embedded()).await;
    let key_file = server.data_dir.path().join("api-key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(server.api_key.starts_with("sm_") && server.api_key.len() == 35);
    assert!(
        server.data_dir.path().join("sandbox-manager.db").exists(),
        "SQLite lives in data_dir"
    );

    let health: Value = server
        .http
        .get(server.url("/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["store"]["backend"], "sqlite");
    assert!(health["blobs"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("local:"));

    let archive = targz(&[("rows.csv", b"1\n2\n3\n".to_vec())]);
    let response = server
        .post("/volumes?name=local")
        .body(archive.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let volume: Value = response.json().await.unwrap();
    let id = volume["volume_id"].as_str().unwrap().to_string();
    let blob = server
        .data_dir
        .path()
        .join("blobs")
        .join(volume["blob_key"].as_str().unwrap());
    assert_eq!(std::fs::read(&blob).unwrap(), archive);

    // A restart keeps the key and the data, and creates no second key.
    server.crash();
    server.launch().await;
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().trim(),
        server.api_key
    );
    let download = server
        .get(&format!("/volumes/{id}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().as_ref(), archive.as_slice());

    let bad = server
        .post("/volumes?name=bad")
        .body(b"nope".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let leftovers: Vec<_> = walk(&server.data_dir.path().join("blobs"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    assert_eq!(
        server
            .delete(&format!("/volumes/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert!(!blob.exists(), "delete removes the blob");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
