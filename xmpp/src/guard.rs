//! The nesting limit on what a client reads (`spine_protocol::depth`).
//!
//! The XML stack under tokio-xmpp builds received elements recursively: an IQ nested 6,000
//! levels deep, sent by any account on the same server, overflowed the stack of the
//! dispatcher and of an agent and aborted them. A client cannot refuse what its server
//! relays without losing its own session (and any account could then knock a dispatcher off
//! the bus at will), so it reads through a filter instead: an element that would open deeper
//! than [`MAX_STREAM_DEPTH`] is left out with everything inside it. The stanza that held it
//! still arrives, well-formed, and is answered like any other malformed request.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use spine_protocol::depth::{DepthGuard, MAX_STANZA_DEPTH, MAX_STREAM_DEPTH};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Elements left out for depth by every client of this process.
static ELIDED: AtomicU64 = AtomicU64::new(0);

/// How many received elements were left out because they were nested deeper than
/// [`MAX_STANZA_DEPTH`], by every connection of this process since it started.
pub fn elided_elements() -> u64 {
    ELIDED.load(Ordering::Relaxed)
}

/// Least time between two warnings of one connection.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A byte stream whose reads pass through a [`DepthGuard`] filter; writes pass unchanged.
pub struct DepthFiltered<S> {
    inner: S,
    guard: DepthGuard,
    scratch: Vec<u8>,
    out: Vec<u8>,
    /// Filtered bytes not yet handed to the reader.
    pending: usize,
    last_warn: Option<Instant>,
    /// Elided elements already added to [`ELIDED`], and already reported in a warning.
    counted: u64,
    warned_at: u64,
}

impl<S> DepthFiltered<S> {
    /// Wraps `inner` (a fresh stream: the guard starts at depth 0).
    pub fn new(inner: S) -> Self {
        DepthFiltered {
            inner,
            guard: DepthGuard::new(MAX_STREAM_DEPTH),
            scratch: vec![0; 8192],
            out: Vec::with_capacity(8193),
            pending: 0,
            last_warn: None,
            counted: 0,
            warned_at: 0,
        }
    }

    /// The wrapped stream (for STARTTLS: nothing may be buffered at that point).
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn note_elided(&mut self) {
        let total = self.guard.elided();
        if total == self.counted {
            return;
        }
        ELIDED.fetch_add(total - self.counted, Ordering::Relaxed);
        self.counted = total;
        let now = Instant::now();
        if self
            .last_warn
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            tracing::warn!(
                "left out {} received element(s) nested deeper than {MAX_STANZA_DEPTH} levels \
                 (hostile or broken sender; the stanza holding each is handled without it)",
                total - self.warned_at
            );
            self.last_warn = Some(now);
            self.warned_at = total;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DepthFiltered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending > 0 {
                let start = this.out.len() - this.pending;
                let n = this.pending.min(buf.remaining());
                buf.put_slice(&this.out[start..start + n]);
                this.pending -= n;
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.out.clear();
            this.guard.filter(&this.scratch[..n], &mut this.out);
            this.pending = this.out.len();
            this.note_elided();
            // Everything read may have been left out: read again rather than report an
            // empty read, which would mean end of stream.
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DepthFiltered<S> {
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

    #[tokio::test]
    async fn a_deep_element_is_left_out_and_the_rest_arrives() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = DepthFiltered::new(rx);
        let deep = format!(
            "<stream><iq id='1'>{}{}</iq><iq id='2'/>",
            "<a>".repeat(10_000),
            "</a>".repeat(10_000)
        );
        let writer = tokio::spawn(async move {
            tx.write_all(deep.as_bytes()).await.unwrap();
        });
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        writer.await.unwrap();
        let depth = MAX_STREAM_DEPTH as usize;
        // The stream root and the IQ hold levels 1 and 2; <a> fills the rest up to the limit.
        let want = format!(
            "<stream><iq id='1'>{}{}</iq><iq id='2'/>",
            "<a>".repeat(depth - 2),
            "</a>".repeat(depth - 2)
        );
        assert_eq!(got, want);
        assert!(elided_elements() >= 1);
    }
}
