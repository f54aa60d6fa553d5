//! Async client the orchestrator uses to drive one envd.
//!
//! HTTP/1.1 by default over a pooled connection (TCP or unix socket); HTTP/2
//! with prior knowledge on request ([`EnvdClientBuilder::http2`]) so several
//! calls can share one stream-oriented transport.
//!
//! Before its first call the client checks `/health` once and refuses an agent
//! whose protocol version it does not support ([`crate::is_compatible`]).

mod connector;
mod error;
mod ndjson;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt, TryStreamExt};
use http::{header, Method, Request, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyDataStream, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::OnceCell;

pub use connector::{EnvdConnector, EnvdStream, Target};
pub use error::EnvdError;

use crate::query;
use crate::routes;
use crate::types::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Client for one envd. Cheap to clone (shares the connection pool).
#[derive(Clone)]
pub struct EnvdClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<EnvdConnector, RequestBody>,
    token: String,
    /// `http://host:port` for TCP; a placeholder authority for unix sockets.
    base: String,
    check_version: bool,
    compatible: OnceCell<Health>,
    max_response_bytes: usize,
}

/// What the client buffers of one non-streamed response by default. The
/// agent is inside the sandbox, so it is as hostile as the tenant: nothing
/// it sends may grow the caller's memory without bound.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Options for [`EnvdClient`].
pub struct EnvdClientBuilder {
    target: Target,
    token: String,
    http2: bool,
    check_version: bool,
    max_response_bytes: usize,
}

impl EnvdClientBuilder {
    /// Cap on a buffered (JSON or whole-file) response; beyond it the call
    /// fails with [`EnvdError::TooLarge`].
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Speak HTTP/2 with prior knowledge (envd accepts both on one listener).
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Skip the one-time `/health` protocol check (e.g. for tests of old agents).
    pub fn check_version(mut self, enabled: bool) -> Self {
        self.check_version = enabled;
        self
    }

    pub fn build(self) -> EnvdClient {
        let base = match &self.target {
            Target::Tcp(addr) => format!("http://{addr}"),
            Target::Unix(_) => "http://envd.local".to_string(),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_max_idle_per_host(32);
        if self.http2 {
            builder.http2_only(true);
        }
        let http = builder.build(EnvdConnector::new(self.target));
        EnvdClient {
            inner: Arc::new(Inner {
                http,
                token: self.token,
                base,
                check_version: self.check_version,
                compatible: OnceCell::new(),
                max_response_bytes: self.max_response_bytes,
            }),
        }
    }
}

impl EnvdClient {
    /// Client for an envd listening on a unix socket.
    pub fn unix(path: impl Into<PathBuf>, token: impl Into<String>) -> Self {
        Self::builder(Target::Unix(path.into()), token).build()
    }

    /// Client for an envd listening on TCP.
    pub fn tcp(addr: SocketAddr, token: impl Into<String>) -> Self {
        Self::builder(Target::Tcp(addr), token).build()
    }

    pub fn builder(target: Target, token: impl Into<String>) -> EnvdClientBuilder {
        EnvdClientBuilder {
            target,
            token: token.into(),
            http2: false,
            check_version: true,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    // ----- health -----

    /// `GET /health` (no token needed, no version check).
    pub async fn health(&self) -> Result<Health, EnvdError> {
        let response = self
            .send_unchecked(Method::GET, routes::HEALTH, empty_body(), None)
            .await?;
        decode_json(response, self.inner.max_response_bytes).await
    }

    /// Checks (once per client) that the agent speaks a supported protocol.
    pub async fn check_compatible(&self) -> Result<Health, EnvdError> {
        self.inner
            .compatible
            .get_or_try_init(|| async {
                let health = self.health().await?;
                if crate::is_compatible(health.protocol_version) {
                    Ok(health)
                } else {
                    Err(EnvdError::Incompatible {
                        agent: health.protocol_version,
                        supported_max: crate::PROTOCOL_VERSION,
                    })
                }
            })
            .await
            .cloned()
    }

    // ----- files -----

    /// Streams `body` into `path` (parents created, overwritten if present),
    /// owned by `user`. Nothing is buffered whole on either side.
    pub async fn write_file<S, E>(
        &self,
        path: &str,
        user: &str,
        mode: Option<u32>,
        body: S,
    ) -> Result<WriteInfo, EnvdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let uri = query::build(
            routes::FILES,
            &[
                ("path", Some(path.to_string())),
                ("username", Some(user.to_string())),
                ("mode", mode.map(|m| m.to_string())),
            ],
        );
        let response = self
            .send(Method::PUT, &uri, stream_body(body), Some(OCTETS))
            .await?;
        decode_json(response, self.inner.max_response_bytes).await
    }

    /// Writes a small in-memory file.
    pub async fn write_bytes(
        &self,
        path: &str,
        user: &str,
        data: impl Into<Bytes>,
    ) -> Result<WriteInfo, EnvdError> {
        let data: Bytes = data.into();
        self.write_file(
            path,
            user,
            None,
            futures::stream::once(async move { Ok::<_, BoxError>(data) }),
        )
        .await
    }

    /// Streams the content of `path`.
    pub async fn read_file(
        &self,
        path: &str,
        user: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, EnvdError>>, EnvdError> {
        self.get_stream(&path_query(routes::FILES, path, user))
            .await
    }

    /// Streams the tree under the directory `path` as a tar.gz archive
    /// (read as the agent's root). A failure mid-walk ends the stream in an
    /// error, never in a short clean end.
    pub async fn archive(
        &self,
        path: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, EnvdError>>, EnvdError> {
        self.get_stream(&path_query(routes::FILES_ARCHIVE, path, "root"))
            .await
    }

    /// `GET uri`'s body as a stream of chunks, after a success status.
    async fn get_stream(
        &self,
        uri: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, EnvdError>>, EnvdError> {
        let response = self.send(Method::GET, uri, empty_body(), None).await?;
        let response = check_status(response).await?;
        Ok(BodyDataStream::new(response.into_body())
            .map_err(|e| EnvdError::Transport(e.to_string()))
            .boxed())
    }

    /// What the sandbox uses, as its own kernel counts it (protocol 3).
    pub async fn usage(&self) -> Result<Usage, EnvdError> {
        self.get_json(routes::USAGE).await
    }

    /// Reads a whole file into memory (for small files).
    pub async fn read_to_bytes(&self, path: &str, user: &str) -> Result<Bytes, EnvdError> {
        let mut stream = self.read_file(path, user).await?;
        let limit = self.inner.max_response_bytes;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(EnvdError::TooLarge { limit });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }

    /// Entries under `path`, `depth` levels deep (1 = immediate children).
    pub async fn list(
        &self,
        path: &str,
        user: &str,
        depth: u32,
    ) -> Result<Vec<EntryInfo>, EnvdError> {
        let uri = query::build(
            routes::FILES_LIST,
            &[
                ("path", Some(path.to_string())),
                ("username", Some(user.to_string())),
                ("depth", Some(depth.to_string())),
            ],
        );
        self.get_json(&uri).await
    }

    pub async fn stat(&self, path: &str, user: &str) -> Result<EntryInfo, EnvdError> {
        self.get_json(&path_query(routes::FILES_STAT, path, user))
            .await
    }

    pub async fn exists(&self, path: &str, user: &str) -> Result<bool, EnvdError> {
        let response: ExistsResponse = self
            .get_json(&path_query(routes::FILES_EXISTS, path, user))
            .await?;
        Ok(response.exists)
    }

    /// `mkdir -p`; returns whether the directory was created.
    pub async fn mkdir(&self, path: &str, user: &str) -> Result<bool, EnvdError> {
        let request = MkdirRequest {
            path: path.to_string(),
            username: user.to_string(),
        };
        let response: MkdirResponse = self.post_json(routes::FILES_MKDIR, &request).await?;
        Ok(response.created)
    }

    /// Mounts a block device of the VM on a directory (protocol 2).
    pub async fn mount_block(&self, request: &BlockMountRequest) -> Result<(), EnvdError> {
        let _: Empty = self.post_json(routes::VOLUMES_BLOCK_MOUNT, request).await?;
        Ok(())
    }

    /// Syncs and unmounts what [`Self::mount_block`] mounted on `path`.
    pub async fn unmount_block(&self, path: &str) -> Result<(), EnvdError> {
        let request = BlockUnmountRequest {
            path: path.to_string(),
        };
        let _: Empty = self
            .post_json(routes::VOLUMES_BLOCK_UNMOUNT, &request)
            .await?;
        Ok(())
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, path: &str, user: &str) -> Result<(), EnvdError> {
        let response = self
            .send(
                Method::DELETE,
                &path_query(routes::FILES, path, user),
                empty_body(),
                None,
            )
            .await?;
        let _: Empty = decode_json(response, self.inner.max_response_bytes).await?;
        Ok(())
    }

    pub async fn rename(
        &self,
        old_path: &str,
        new_path: &str,
        user: &str,
    ) -> Result<EntryInfo, EnvdError> {
        let request = RenameRequest {
            old_path: old_path.to_string(),
            new_path: new_path.to_string(),
            username: user.to_string(),
        };
        self.post_json(routes::FILES_RENAME, &request).await
    }

    /// Streams a tar archive (gzipped when `gzip`) into directory `dest`.
    pub async fn unpack<S, E>(
        &self,
        dest: &str,
        user: &str,
        body: S,
        gzip: bool,
    ) -> Result<UnpackReport, EnvdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.unpack_limited(dest, user, body, gzip, UnpackLimits::default())
            .await
    }

    /// [`Self::unpack`] with archive limits the agent applies: the unpack
    /// fails, naming the limit, once the archive passes one.
    pub async fn unpack_limited<S, E>(
        &self,
        dest: &str,
        user: &str,
        body: S,
        gzip: bool,
        limits: UnpackLimits,
    ) -> Result<UnpackReport, EnvdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let uri = query::build(
            routes::FILES_UNPACK,
            &[
                ("path", Some(dest.to_string())),
                ("username", Some(user.to_string())),
                ("max_bytes", limits.max_bytes.map(|n| n.to_string())),
                ("max_entries", limits.max_entries.map(|n| n.to_string())),
                (
                    "max_header_bytes",
                    limits.max_header_bytes.map(|n| n.to_string()),
                ),
                ("max_ratio", limits.max_ratio.map(|n| n.to_string())),
            ],
        );
        let content_type = if gzip { GZIP_TAR } else { TAR };
        let response = self
            .send(Method::POST, &uri, stream_body(body), Some(content_type))
            .await?;
        decode_json(response, self.inner.max_response_bytes).await
    }

    // ----- processes -----

    /// Replaces the sandbox-level environment of later processes.
    /// `POST /init`: hands a token-less agent its token, clock, entropy and
    /// hostname (no token needed; the agent accepts it once).
    pub async fn init(&self, request: &InitRequest) -> Result<(), EnvdError> {
        let response = self
            .send_unchecked(Method::POST, routes::INIT, json_body(request)?, Some(JSON))
            .await?;
        let _: Empty = decode_json(response, self.inner.max_response_bytes).await?;
        Ok(())
    }

    pub async fn set_env(
        &self,
        envs: std::collections::BTreeMap<String, String>,
    ) -> Result<(), EnvdError> {
        let response = self
            .send(
                Method::PUT,
                routes::ENV,
                json_body(&SetEnvRequest { envs })?,
                Some(JSON),
            )
            .await?;
        let _: Empty = decode_json(response, self.inner.max_response_bytes).await?;
        Ok(())
    }

    /// Runs a command in the foreground and returns its output.
    pub async fn run(&self, request: &ProcessRequest) -> Result<RunResult, EnvdError> {
        self.post_json(routes::PROCESSES_RUN, request).await
    }

    /// Starts a background command; returns its pid.
    pub async fn start(&self, request: &ProcessRequest) -> Result<u32, EnvdError> {
        let started: StartedProcess = self.post_json(routes::PROCESSES_START, request).await?;
        Ok(started.pid)
    }

    /// Waits for a background command; returns its output and exit code.
    pub async fn wait(&self, pid: u32) -> Result<RunResult, EnvdError> {
        self.post_json(&routes::process_wait(pid), &Empty {}).await
    }

    pub async fn write_stdin(&self, pid: u32, data: &str) -> Result<(), EnvdError> {
        let request = StdinRequest {
            data: data.to_string(),
            base64: false,
        };
        let _: Empty = self
            .post_json(&routes::process_stdin(pid), &request)
            .await?;
        Ok(())
    }

    pub async fn close_stdin(&self, pid: u32) -> Result<(), EnvdError> {
        let _: Empty = self
            .post_json(&routes::process_close_stdin(pid), &Empty {})
            .await?;
        Ok(())
    }

    /// Kills the process group of `pid`; false when the pid is not tracked.
    /// Starts a login shell on a new pseudo-terminal; returns its pid
    /// (input: [`Self::write_stdin`], kill: [`Self::kill`]).
    pub async fn pty_start(&self, request: &PtyRequest) -> Result<u32, EnvdError> {
        let started: StartedProcess = self.post_json(routes::PTY, request).await?;
        Ok(started.pid)
    }

    /// The terminal's output from now on, ending with its exit.
    pub async fn pty_stream(
        &self,
        pid: u32,
    ) -> Result<BoxStream<'static, Result<PtyEvent, EnvdError>>, EnvdError> {
        let response = self
            .send(Method::GET, &routes::pty_stream(pid), empty_body(), None)
            .await?;
        let response = check_status(response).await?;
        Ok(ndjson::events(response.into_body()))
    }

    pub async fn pty_resize(&self, pid: u32, size: PtySize) -> Result<(), EnvdError> {
        let _: Empty = self.post_json(&routes::pty_resize(pid), &size).await?;
        Ok(())
    }

    pub async fn kill(&self, pid: u32) -> Result<bool, EnvdError> {
        let response = self
            .send(Method::DELETE, &routes::process(pid), empty_body(), None)
            .await?;
        let response: KillResponse = decode_json(response, self.inner.max_response_bytes).await?;
        Ok(response.killed)
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>, EnvdError> {
        self.get_json(routes::PROCESSES).await
    }

    /// Starts a command and streams its events: `Start`, then `Stdout` /
    /// `Stderr` / `Keepalive` as they come, then `Exit`.
    pub async fn stream(
        &self,
        request: &ProcessRequest,
    ) -> Result<BoxStream<'static, Result<ProcessEvent, EnvdError>>, EnvdError> {
        let response = self
            .send(
                Method::POST,
                routes::PROCESSES_STREAM,
                json_body(request)?,
                Some(JSON),
            )
            .await?;
        let response = check_status(response).await?;
        Ok(ndjson::events(response.into_body()))
    }

    // ----- plumbing -----

    async fn get_json<T: DeserializeOwned>(&self, uri: &str) -> Result<T, EnvdError> {
        let response = self.send(Method::GET, uri, empty_body(), None).await?;
        decode_json(response, self.inner.max_response_bytes).await
    }

    async fn post_json<Req: Serialize, T: DeserializeOwned>(
        &self,
        uri: &str,
        body: &Req,
    ) -> Result<T, EnvdError> {
        let response = self
            .send(Method::POST, uri, json_body(body)?, Some(JSON))
            .await?;
        decode_json(response, self.inner.max_response_bytes).await
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: RequestBody,
        content: Option<BodyKind>,
    ) -> Result<http::Response<Incoming>, EnvdError> {
        if self.inner.check_version {
            self.check_compatible().await?;
        }
        self.send_unchecked(method, path_and_query, body, content)
            .await
    }

    async fn send_unchecked(
        &self,
        method: Method,
        path_and_query: &str,
        body: RequestBody,
        content: Option<BodyKind>,
    ) -> Result<http::Response<Incoming>, EnvdError> {
        let uri = format!("{}{}", self.inner.base, path_and_query);
        let mut request = Request::builder().method(method).uri(uri).header(
            header::AUTHORIZATION,
            format!("{} {}", crate::AUTHORIZATION_SCHEME, self.inner.token),
        );
        if let Some(kind) = content {
            request = request.header(header::CONTENT_TYPE, kind.content_type);
            if let Some(encoding) = kind.content_encoding {
                request = request.header(header::CONTENT_ENCODING, encoding);
            }
        }
        let request = request
            .body(body)
            .map_err(|e| EnvdError::Transport(e.to_string()))?;
        self.inner
            .http
            .request(request)
            .await
            .map_err(|e| EnvdError::Transport(format!("{e:?}")))
    }
}

/// Content headers of a request body.
#[derive(Clone, Copy)]
struct BodyKind {
    content_type: &'static str,
    content_encoding: Option<&'static str>,
}

const JSON: BodyKind = BodyKind {
    content_type: "application/json",
    content_encoding: None,
};
const OCTETS: BodyKind = BodyKind {
    content_type: "application/octet-stream",
    content_encoding: None,
};
const TAR: BodyKind = BodyKind {
    content_type: "application/x-tar",
    content_encoding: None,
};
const GZIP_TAR: BodyKind = BodyKind {
    content_type: "application/x-tar",
    content_encoding: Some("gzip"),
};

fn path_query(route: &str, path: &str, user: &str) -> String {
    query::build(
        route,
        &[
            ("path", Some(path.to_string())),
            ("username", Some(user.to_string())),
        ],
    )
}

fn empty_body() -> RequestBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_body<T: Serialize>(value: &T) -> Result<RequestBody, EnvdError> {
    let bytes = serde_json::to_vec(value).map_err(|e| EnvdError::Decode(e.to_string()))?;
    Ok(Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed_unsync())
}

fn stream_body<S, E>(body: S) -> RequestBody
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    BodyExt::boxed_unsync(StreamBody::new(
        body.map_ok(Frame::data).map_err(Into::into),
    ))
}

/// Turns a non-2xx response into [`EnvdError::Api`].
async fn check_status(
    response: http::Response<Incoming>,
) -> Result<http::Response<Incoming>, EnvdError> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    // An error body is a short message; a longer one is cut, not buffered.
    let bytes = collect_limited(response, ERROR_BODY_LIMIT)
        .await
        .unwrap_or_else(|e| Bytes::from(e.to_string()));
    Err(api_error(status, &bytes))
}

fn api_error(status: StatusCode, body: &[u8]) -> EnvdError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => EnvdError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
        },
        Err(_) => EnvdError::Api {
            status: status.as_u16(),
            code: error_code::INTERNAL.to_string(),
            message: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

const ERROR_BODY_LIMIT: usize = 64 << 10;

/// The whole body, or [`EnvdError::TooLarge`] as soon as it passes `limit`.
async fn collect_limited(
    response: http::Response<Incoming>,
    limit: usize,
) -> Result<Bytes, EnvdError> {
    let mut body = BodyDataStream::new(response.into_body());
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| EnvdError::Transport(e.to_string()))?;
        if out.len() + chunk.len() > limit {
            return Err(EnvdError::TooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}

async fn decode_json<T: DeserializeOwned>(
    response: http::Response<Incoming>,
    limit: usize,
) -> Result<T, EnvdError> {
    let response = check_status(response).await?;
    let bytes = collect_limited(response, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| EnvdError::Decode(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
}
