//! The transport under each XML stream: plain TCP or TLS, with a per-stanza size limit and an
//! optional inbound rate limit.
//!
//! tokio-xmpp's XML stream has no stanza size limit, so the server counts the bytes read since
//! the last complete top-level element and fails the read once they exceed the limit. The count
//! is taken below the stream's read buffer, so it can be off by at most one buffer (8 KiB).
//! The same adapter caps element nesting (`spine_protocol::depth`): the XML stack above builds
//! elements recursively, and a stanza nested a few thousand levels deep overflowed the stack
//! and aborted the process before any limit of the parser's own applied.
//!
//! This adapter is a poll-level wrapper because that is where bytes can be refused before
//! they are buffered or parsed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use spine_protocol::depth::{DepthGuard, MAX_STREAM_DEPTH};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

/// Plain TCP before STARTTLS (or on loopback), TLS after.
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Shared between the session task and its transport: bytes since the last complete element,
/// and which limit, if any, failed the last read.
#[derive(Debug, Default)]
pub struct StanzaMeter {
    since_last: AtomicU64,
    exceeded: AtomicBool,
    too_deep: AtomicBool,
}

impl StanzaMeter {
    /// A complete element arrived: start counting the next one.
    pub fn element_done(&self) {
        self.since_last.store(0, Ordering::Relaxed);
    }

    /// Whether the last read failed because the size limit was exceeded.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// Whether the last read failed because elements were nested too deep.
    pub fn too_deep(&self) -> bool {
        self.too_deep.load(Ordering::Relaxed)
    }
}

/// Token bucket for the inbound rate limit.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

/// A transport with a stanza size limit, a nesting limit and an optional rate limit on reads.
pub struct Limited {
    inner: Transport,
    meter: Arc<StanzaMeter>,
    limit: u64,
    depth: DepthGuard,
    bucket: Option<Bucket>,
}

impl Limited {
    /// Wraps `inner`. `rate` in bytes per second, if limited.
    pub fn new(inner: Transport, meter: Arc<StanzaMeter>, limit: u64, rate: Option<u64>) -> Self {
        let bucket = rate.map(|r| Bucket {
            rate: r as f64,
            // One second of burst, and at least one read buffer so reads can make progress.
            tokens: (r as f64).max(8192.0),
            last: Instant::now(),
            sleep: None,
        });
        Limited {
            inner,
            meter,
            limit,
            depth: DepthGuard::new(MAX_STREAM_DEPTH),
            bucket,
        }
    }

    /// The transport, for STARTTLS.
    pub fn into_inner(self) -> Transport {
        self.inner
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut max = buf.remaining();
        if let Some(b) = &mut this.bucket {
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * b.rate)
                .min(b.rate.max(8192.0));
            b.last = now;
            if b.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - b.tokens) / b.rate)
                    .max(Duration::from_millis(1));
                let sleep = b
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                b.sleep = None;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            max = max.min(b.tokens as usize);
        }
        let before = buf.filled().len();
        let read = if max < buf.remaining() {
            // Rate-limited: read at most `max` bytes through a small temporary buffer.
            let mut tmp = vec![0u8; max];
            let mut small = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut small) {
                Poll::Ready(Ok(())) => {
                    buf.put_slice(small.filled());
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        } else {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = read {
            let n = (buf.filled().len() - before) as u64;
            if let Err(e) = this.depth.scan(&buf.filled()[before..]) {
                this.meter.too_deep.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            if let Some(b) = &mut this.bucket {
                b.tokens -= n as f64;
            }
            let total = this.meter.since_last.fetch_add(n, Ordering::Relaxed) + n;
            if total > this.limit {
                this.meter.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("stanza larger than the limit of {} bytes", this.limit),
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn size_limit_fails_the_read_and_resets_per_element() {
        let (mut tx, rx) = pair().await;
        let meter = Arc::new(StanzaMeter::default());
        let mut lim = Limited::new(Transport::Plain(rx), meter.clone(), 1000, None);
        tx.write_all(&[b'x'; 900]).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = 0;
        while got < 900 {
            got += lim.read(&mut buf).await.unwrap();
        }
        meter.element_done();
        tx.write_all(&[b'y'; 900]).await.unwrap();
        let mut got = 0;
        while got < 900 {
            got += lim.read(&mut buf).await.unwrap();
        }
        assert!(
            !meter.exceeded(),
            "900 + 900 bytes with a reset between are within a 1000-byte limit"
        );
        tx.write_all(&[b'z'; 200]).await.unwrap();
        let err = loop {
            match lim.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(meter.exceeded());
    }

    /// Correctness of the token bucket, not a speed claim: reading 96 KiB at 32 KiB/s after a
    /// 32 KiB burst cannot take less than 2 s, however fast or slow the machine is.
    #[tokio::test]
    async fn rate_limit_throttles_reads() {
        let (mut tx, rx) = pair().await;
        let meter = Arc::new(StanzaMeter::default());
        let mut lim = Limited::new(Transport::Plain(rx), meter, u64::MAX, Some(32 * 1024));
        let writer = tokio::spawn(async move {
            tx.write_all(&vec![7u8; 96 * 1024]).await.unwrap();
            tx
        });
        let t0 = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0;
        while got < 96 * 1024 {
            got += lim.read(&mut buf).await.unwrap();
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(1900),
            "96 KiB at 32 KiB/s took only {took:?}"
        );
        drop(writer.await.unwrap());
    }
}
