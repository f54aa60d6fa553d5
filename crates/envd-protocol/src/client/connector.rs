//! Connector for hyper-util's pooled client that reaches envd over TCP or a
//! unix socket (the authority in the request URI is ignored for unix).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Where envd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Clone)]
pub struct EnvdConnector {
    target: Arc<Target>,
}

impl EnvdConnector {
    pub fn new(target: Target) -> Self {
        Self {
            target: Arc::new(target),
        }
    }
}

impl tower::Service<http::Uri> for EnvdConnector {
    type Response = TokioIo<EnvdStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let target = self.target.clone();
        Box::pin(async move {
            let stream = match &*target {
                Target::Tcp(addr) => {
                    let stream = TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    EnvdStream::Tcp(stream)
                }
                Target::Unix(path) => EnvdStream::Unix(UnixStream::connect(path).await?),
            };
            Ok(TokioIo::new(stream))
        })
    }
}

/// A connection to envd over either transport.
pub enum EnvdStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection for EnvdStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for EnvdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EnvdStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            EnvdStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EnvdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EnvdStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            EnvdStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EnvdStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            EnvdStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EnvdStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            EnvdStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EnvdStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            EnvdStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}
