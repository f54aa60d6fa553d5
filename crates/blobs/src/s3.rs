//! S3 backend (tested against Garage). Uploads buffer one part at a time and
//! send at most `max_inflight_parts` parts concurrently, so memory stays at
//! about `part_size × (max_inflight_parts + 1)` whatever the blob size. A
//! sent part's buffer is reused for a later part, so an upload allocates
//! (and faults in) those buffers once, not once per part.
//! Blobs smaller than one part go up as a single PutObject.

use crate::{BlobError, BlobReader, BlobResult, BlobStore, BlobUpload};
use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::io::ReaderStream;

#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub path_style: bool,
    /// Static credentials; when `None` the standard `AWS_ACCESS_KEY_ID` /
    /// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` variables are used.
    pub credentials: Option<(String, String)>,
    pub part_size: usize,
    pub max_inflight_parts: usize,
}

pub struct S3BlobStore {
    client: Client,
    settings: S3Settings,
}

fn backend_error<E, R>(what: &str, err: SdkError<E, R>) -> BlobError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    BlobError::Backend(format!("{what}: {}", DisplayErrorContext(&err)))
}

impl S3BlobStore {
    pub fn new(settings: S3Settings) -> BlobResult<Self> {
        let (key_id, secret, token) = match &settings.credentials {
            Some((id, secret)) => (id.clone(), secret.clone(), None),
            None => (
                std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| {
                    BlobError::Backend("no S3 credentials in config or AWS_ACCESS_KEY_ID".into())
                })?,
                std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| {
                    BlobError::Backend("AWS_ACCESS_KEY_ID set without AWS_SECRET_ACCESS_KEY".into())
                })?,
                std::env::var("AWS_SESSION_TOKEN").ok(),
            ),
        };
        if settings.part_size < 5 << 20 {
            return Err(BlobError::Backend(
                "S3 part size must be at least 5 MiB".into(),
            ));
        }
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(Credentials::new(
                key_id,
                secret,
                token,
                None,
                "sandbox-manager",
            ))
            .force_path_style(settings.path_style)
            // Checksums only where S3 requires them: S3-compatible stores
            // (Garage, MinIO) differ in which flexible checksums they accept.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        Ok(S3BlobStore {
            client: Client::from_conf(config.build()),
            settings,
        })
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    fn describe(&self) -> String {
        match &self.settings.endpoint {
            Some(endpoint) => format!("s3://{}@{endpoint}", self.settings.bucket),
            None => format!("s3://{}", self.settings.bucket),
        }
    }

    async fn check(&self) -> BlobResult<()> {
        self.client
            .head_bucket()
            .bucket(&self.settings.bucket)
            .send()
            .await
            .map_err(|e| backend_error("head bucket", e))?;
        Ok(())
    }

    async fn begin_upload(&self, key: &str) -> BlobResult<Box<dyn BlobUpload>> {
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.settings.bucket.clone(),
            key: key.to_string(),
            part_size: self.settings.part_size,
            buffer: BytesMut::with_capacity(self.settings.part_size),
            spare_buffers: Arc::default(),
            multipart: None,
            inflight: Arc::new(Semaphore::new(self.settings.max_inflight_parts.max(1))),
            parts: JoinSet::new(),
            completed: Vec::new(),
            next_part: 1,
            written: 0,
            finished: false,
        }))
    }

    async fn get(&self, key: &str) -> BlobResult<BlobReader> {
        let object = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| match e.as_service_error() {
                Some(service) if service.is_no_such_key() => BlobError::NotFound(key.to_string()),
                _ => backend_error("get object", e),
            })?;
        let size = object.content_length().unwrap_or(0).max(0) as u64;
        let reader = object.body.into_async_read();
        Ok(BlobReader {
            size,
            stream: ReaderStream::with_capacity(reader, 256 << 10).boxed(),
        })
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| backend_error("delete object", e))?;
        Ok(())
    }

    async fn list_keys(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| backend_error("list objects", e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        Ok(keys)
    }

    async fn pending_uploads(&self, prefix: &str) -> BlobResult<Vec<String>> {
        Ok(self
            .multipart_uploads(prefix)
            .await?
            .into_iter()
            .map(|u| u.key)
            .collect())
    }

    async fn abort_uploads(&self, prefix: &str) -> BlobResult<usize> {
        let mut aborted = 0;
        for upload in self.multipart_uploads(prefix).await? {
            self.client
                .abort_multipart_upload()
                .bucket(&self.settings.bucket)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .send()
                .await
                .map_err(|e| backend_error("abort multipart upload", e))?;
            tracing::info!(key = %upload.key, upload_id = %upload.upload_id, "aborted multipart upload");
            aborted += 1;
        }
        Ok(aborted)
    }
}

struct PendingUpload {
    key: String,
    upload_id: String,
}

impl S3BlobStore {
    async fn multipart_uploads(&self, prefix: &str) -> BlobResult<Vec<PendingUpload>> {
        let mut found = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.settings.bucket)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| backend_error("list multipart uploads", e))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                found.push(PendingUpload {
                    key: key.to_string(),
                    upload_id: id.to_string(),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

struct S3Upload {
    client: Client,
    bucket: String,
    key: String,
    part_size: usize,
    buffer: BytesMut,
    /// Buffers of parts already sent, for the next parts.
    spare_buffers: Arc<std::sync::Mutex<Vec<BytesMut>>>,
    /// Upload id, created lazily once the blob outgrows one part.
    multipart: Option<String>,
    inflight: Arc<Semaphore>,
    parts: JoinSet<BlobResult<CompletedPart>>,
    completed: Vec<CompletedPart>,
    next_part: i32,
    written: u64,
    finished: bool,
}

impl S3Upload {
    async fn send_part(&mut self, body: Bytes) -> BlobResult<()> {
        let upload_id = match &self.multipart {
            Some(id) => id.clone(),
            None => {
                let created = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .content_type("application/gzip")
                    .send()
                    .await
                    .map_err(|e| backend_error("create multipart upload", e))?;
                let id = created
                    .upload_id()
                    .ok_or_else(|| BlobError::Backend("no upload id returned".into()))?
                    .to_string();
                self.multipart = Some(id.clone());
                id
            }
        };
        // Waiting for a permit is the back-pressure that bounds memory.
        let permit = self
            .inflight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        // Collect finished parts, surfacing a failure before queueing more.
        while let Some(done) = self.parts.try_join_next() {
            self.completed
                .push(done.map_err(|e| BlobError::Backend(e.to_string()))??);
        }
        let part_number = self.next_part;
        self.next_part += 1;
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
        let (spares, keep) = (self.spare_buffers.clone(), body.clone());
        self.parts.spawn(async move {
            let _permit = permit;
            let uploaded = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(part_number)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| backend_error("upload part", e))?;
            // The SDK has let go of the body: its buffer serves again.
            if let Ok(mut buffer) = keep.try_into_mut() {
                buffer.clear();
                spares.lock().unwrap().push(buffer);
            }
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(uploaded.e_tag().map(str::to_string))
                .build())
        });
        Ok(())
    }

    async fn finish_multipart(&mut self, upload_id: String) -> BlobResult<()> {
        while let Some(done) = self.parts.join_next().await {
            self.completed
                .push(done.map_err(|e| BlobError::Backend(e.to_string()))??);
        }
        let mut completed = std::mem::take(&mut self.completed);
        completed.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| backend_error("complete multipart upload", e))?;
        Ok(())
    }

    async fn finish(&mut self) -> BlobResult<u64> {
        let rest = self.buffer.split().freeze();
        match self.multipart.clone() {
            None => {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .content_type("application/gzip")
                    .body(ByteStream::from(rest))
                    .send()
                    .await
                    .map_err(|e| backend_error("put object", e))?;
            }
            Some(upload_id) => {
                if !rest.is_empty() {
                    self.send_part(rest).await?;
                }
                self.finish_multipart(upload_id).await?;
            }
        }
        Ok(self.written)
    }
}

fn spawn_abort(client: Client, bucket: String, key: String, upload_id: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let result =
            client.abort_multipart_upload().bucket(&bucket).key(&key).upload_id(&upload_id).send().await;
        match result {
            Ok(_) => tracing::info!(key, upload_id, "aborted multipart upload"),
            Err(e) => tracing::warn!(key, upload_id, error = %DisplayErrorContext(&e), "abort failed; the start-up sweep will retry"),
        }
    });
}

#[async_trait]
impl BlobUpload for S3Upload {
    async fn write(&mut self, mut chunk: Bytes) -> BlobResult<()> {
        self.written += chunk.len() as u64;
        while !chunk.is_empty() {
            let room = self.part_size - self.buffer.len();
            let take = room.min(chunk.len());
            self.buffer.extend_from_slice(&chunk.split_to(take));
            if self.buffer.len() == self.part_size {
                let part = std::mem::take(&mut self.buffer).freeze();
                self.send_part(part).await?;
                // Taken once the part holds its in-flight permit, so at most
                // `max_inflight_parts + 1` buffers ever exist.
                let spare = self.spare_buffers.lock().unwrap().pop();
                self.buffer = spare.unwrap_or_else(|| BytesMut::with_capacity(self.part_size));
            }
        }
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> BlobResult<u64> {
        let result = self.finish().await;
        if result.is_ok() {
            self.finished = true;
        }
        // On failure, Drop aborts the multipart upload.
        result
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.parts.abort_all();
        while self.parts.join_next().await.is_some() {}
        if let Some(upload_id) = self.multipart.take() {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(|e| backend_error("abort multipart upload", e))?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.parts.abort_all();
        if let Some(upload_id) = self.multipart.take() {
            spawn_abort(
                self.client.clone(),
                self.bucket.clone(),
                self.key.clone(),
                upload_id,
            );
        }
    }
}
