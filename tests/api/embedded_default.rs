//! The embedded default: no database URL, no S3, just a data_dir.

use crate::common::{self, files_under, targz, Api, Reply, TestServer};
use reqwest::StatusCode;
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

    let health = server.http.get(server.url("/health")).json_reply().await;
    assert_eq!(health["store"]["backend"], "sqlite");
    assert!(health["blobs"]["backend"]
        .as_str()
        .unwrap()
        .starts_with("local:"));

    let archive = targz(&[("rows.csv", b"1\n2\n3\n".to_vec())]);
    let (status, volume) = server.upload_volume("local", archive.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
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
    assert_eq!(server.download_volume(&id).await, archive);

    let (bad, _) = server.upload_volume("bad", b"nope".to_vec()).await;
    assert_eq!(bad, StatusCode::BAD_REQUEST);
    let leftovers: Vec<_> = files_under(&server.data_dir.path().join("blobs"))
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
