//! A listener whose connections fail a write that has made no progress for `http.send_timeout_ms`.
//!
//! Why: hyper writes a response as fast as the client takes it and has no write timeout. A
//! client that stops reading an event stream leaves hyper waiting on a full socket forever: the
//! connection stays open, and graceful shutdown waits for it. Failing the stalled write makes
//! hyper close the connection. A slow client that still takes bytes is not affected: the clock
//! restarts with every byte written.
//!
//! Why `TCP_NOTSENT_LOWAT`: Linux grows a connection's send buffer to megabytes on its own, so a
//! client that stopped reading would be sent stale events into the kernel for minutes before
//! anything noticed. The option bounds the bytes written but not yet sent to
//! [`NOTSENT_LOWAT`] without limiting what is in flight (throughput is unchanged): a stalled
//! client is noticed after that much, and the per-subscriber buffer is the bound that counts.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tracing::debug;

/// Unsent bytes the kernel holds for a connection before a write waits (Linux).
pub const NOTSENT_LOWAT: u32 = 16 * 1024;

/// [`TcpListener`] handing out [`StalledStream`]s.
#[derive(Debug)]
pub struct StallGuard {
    listener: TcpListener,
    timeout: Duration,
}

impl StallGuard {
    /// Connections of `listener` whose writes may wait at most `timeout`.
    pub fn new(listener: TcpListener, timeout: Duration) -> Self {
        Self { listener, timeout }
    }
}

impl axum::serve::Listener for StallGuard {
    type Io = StalledStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
            debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
        }
        (
            StalledStream {
                stream,
                timeout: self.timeout,
                stalled: None,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A TCP stream whose writes fail with [`io::ErrorKind::TimedOut`] once the peer has taken no
/// bytes for the timeout.
#[derive(Debug)]
pub struct StalledStream {
    stream: TcpStream,
    timeout: Duration,
    /// Runs while a write waits; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl StalledStream {
    /// What a write returned: progress resets the clock; waiting runs it, and past the timeout
    /// the write fails.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                debug!(
                    timeout_ms = timeout.as_millis() as u64,
                    "closing a connection whose client takes no bytes"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no bytes within http.send_timeout_ms",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for StalledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for StalledStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_the_peer_never_takes_fails_after_the_timeout_and_a_reading_peer_is_spared() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut guard = StallGuard::new(listener, Duration::from_millis(300));
        let chunk = vec![b'x'; 64 * 1024];

        // A peer that never reads: the kernel buffers fill, then the write times out.
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = axum::serve::Listener::accept(&mut guard).await;
        let started = std::time::Instant::now();
        let failed = loop {
            if let Err(e) = io.write_all(&chunk).await {
                break e;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never stalled");
        };
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        drop(silent);

        // A peer that reads, slowly, but always within the timeout: every write succeeds.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = axum::serve::Listener::accept(&mut guard).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match slow.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        for _ in 0..20 {
            io.write_all(&chunk)
                .await
                .expect("a reading peer is never timed out");
        }
        drop(io);
        assert_eq!(reader.await.unwrap(), 20 * chunk.len());
    }
}
