//! The sending side of a chunked blob upload (docs/PROTOCOL.md §13), written once for the
//! dispatcher (a large job input, sent to an agent before its job) and the agent (a large
//! output, sent to the dispatcher before its result).
//!
//! A caller that has bytes over [`INLINE_LIMIT`](crate::INLINE_LIMIT) to send makes an
//! [`UploadWindow`], sends each [`Chunk`] that [`UploadWindow::next_chunk`] gives in an IQ
//! set, calls [`UploadWindow::acked`] for each IQ result and asks for more, and sends the
//! stanza that refers to the blob once [`UploadWindow::is_complete`]. The window only counts:
//! it does no I/O, reads no clock and knows nothing of IQ ids, which stay with the caller's
//! request correlation. A refused chunk ends the upload; that too is the caller's decision.

use std::sync::Arc;

use crate::job::{chunk_at, chunk_count};
use crate::{BlobId, Chunk};

/// What a chunk stanza adds to its base64 text (the `<iq>` and `<chunk>` elements with their
/// attributes): an estimate, used only to say which stanza may have been too large.
const STANZA_OVERHEAD: usize = 256;

/// One blob being sent as [`Chunk`]s with at most `window` of them unacknowledged.
///
/// Chunks go out in order, each exactly once per session; the blob is complete when every
/// chunk has been sent and acknowledged. The window holds the one copy of the bytes (shared
/// through the `Arc`) and cuts each chunk as it is sent, so a large blob is not kept twice.
#[derive(Debug, Clone)]
pub struct UploadWindow {
    /// The blob's id, in every chunk.
    blob: BlobId,
    /// The blob's bytes; chunks are cut from them on demand (again after a restart).
    data: Arc<Vec<u8>>,
    /// The most chunks sent and not yet acknowledged.
    window: usize,
    /// How many chunks the blob is cut into ([`crate::chunks`]).
    count: usize,
    /// Index of the next chunk to send.
    next: usize,
    /// How many of the sent chunks were acknowledged (acknowledgements are not matched to
    /// chunks: the receiver takes them in any order and only their number matters).
    acked: usize,
    /// The largest chunk stanza sent so far, in bytes (estimated).
    largest: usize,
}

impl UploadWindow {
    /// An upload of `data` as blob `blob` with at most `window` chunks in flight (a window of
    /// 0 is taken as 1, so that the upload can progress). Nothing is sent yet.
    pub fn new(blob: BlobId, data: Arc<Vec<u8>>, window: usize) -> Self {
        let count = chunk_count(data.len());
        UploadWindow {
            blob,
            data,
            window: window.max(1),
            count,
            next: 0,
            acked: 0,
            largest: 0,
        }
    }

    /// The next chunk to send, or `None` when `window` chunks are unacknowledged or every
    /// chunk has been sent. Call it until `None` after creating the upload, after each
    /// [`acked`](Self::acked) and after a [`restart`](Self::restart).
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        if self.next >= self.count || self.in_flight() >= self.window {
            return None;
        }
        let chunk = chunk_at(&self.blob, &self.data, self.next);
        self.next += 1;
        // Base64 of the bytes and the element around them.
        let size = chunk.bytes.len().div_ceil(3) * 4 + STANZA_OVERHEAD;
        self.largest = self.largest.max(size);
        Some(chunk)
    }

    /// One sent chunk was acknowledged. An acknowledgement with nothing in flight (a stale
    /// reply from before a [`restart`](Self::restart)) is ignored.
    pub fn acked(&mut self) {
        if self.acked < self.next {
            self.acked += 1;
        }
    }

    /// Every chunk was sent and acknowledged: the stanza that refers to the blob may go.
    pub fn is_complete(&self) -> bool {
        self.acked == self.count
    }

    /// Starts the upload over, after the XMPP session was re-established: the
    /// acknowledgements of the old session are lost, so every chunk is pending again and none
    /// is in flight. The largest stanza size is kept.
    pub fn restart(&mut self) {
        self.next = 0;
        self.acked = 0;
    }

    /// The blob's id.
    pub fn blob(&self) -> &BlobId {
        &self.blob
    }

    /// The blob's size in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// The blob has no bytes (it is still sent, as one empty chunk).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// How many chunks the blob is cut into.
    pub fn chunk_count(&self) -> usize {
        self.count
    }

    /// Chunks sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.next - self.acked
    }

    /// The size of the largest chunk stanza sent so far (base64 of its bytes plus the
    /// elements around them, an estimate; 0 before the first): if the session ends right
    /// after, a caller can blame an oversized stanza.
    pub fn largest_stanza(&self) -> usize {
        self.largest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{chunks, INLINE_LIMIT};
    use proptest::prelude::*;

    fn blob() -> BlobId {
        "out-1".parse().expect("valid blob id")
    }

    fn bytes(n: usize) -> Arc<Vec<u8>> {
        Arc::new((0..n).map(|i| (i % 251) as u8).collect())
    }

    /// Sends what the window allows; returns the chunks sent.
    fn fill(u: &mut UploadWindow) -> Vec<Chunk> {
        std::iter::from_fn(|| u.next_chunk()).collect()
    }

    #[test]
    fn a_window_of_8_is_never_exceeded() {
        // 20 chunks: 8 go, then one per acknowledgement.
        let mut u = UploadWindow::new(blob(), bytes(20 * INLINE_LIMIT), 8);
        assert_eq!(u.chunk_count(), 20);
        assert_eq!(fill(&mut u).len(), 8);
        assert_eq!(u.in_flight(), 8);
        assert!(u.next_chunk().is_none());
        u.acked();
        assert_eq!(fill(&mut u).len(), 1);
        assert_eq!(u.in_flight(), 8);
        u.acked();
        u.acked();
        assert_eq!(fill(&mut u).len(), 2);
        assert_eq!(u.in_flight(), 8);
    }

    #[test]
    fn chunks_go_in_order_and_equal_the_blobs_chunks() {
        let data = bytes(3 * INLINE_LIMIT + 5);
        let mut u = UploadWindow::new(blob(), data.clone(), 2);
        let mut sent = Vec::new();
        while !u.is_complete() {
            let got = fill(&mut u);
            assert!(!got.is_empty(), "the upload stalled");
            for _ in &got {
                u.acked();
            }
            sent.extend(got);
        }
        let offsets: Vec<u64> = sent.iter().map(|c| c.offset).collect();
        assert_eq!(offsets, [0, 65536, 131072, 196608]);
        assert_eq!(sent, chunks(&blob(), &data));
        assert_eq!(u.len(), data.len());
        assert_eq!(u.blob(), &blob());
    }

    #[test]
    fn complete_only_after_the_last_ack() {
        let mut u = UploadWindow::new(blob(), bytes(2 * INLINE_LIMIT + 1), 8);
        assert_eq!(fill(&mut u).len(), 3);
        assert!(!u.is_complete());
        u.acked();
        u.acked();
        assert!(!u.is_complete());
        u.acked();
        assert!(u.is_complete());
        assert!(u.next_chunk().is_none());
        // A stray acknowledgement changes nothing.
        u.acked();
        assert!(u.is_complete());
        assert_eq!(u.in_flight(), 0);
    }

    #[test]
    fn restart_sends_everything_again() {
        let data = bytes(10 * INLINE_LIMIT);
        let mut u = UploadWindow::new(blob(), data.clone(), 8);
        fill(&mut u);
        for _ in 0..5 {
            u.acked();
        }
        fill(&mut u); // chunks 8..10
        u.restart();
        assert_eq!(u.in_flight(), 0);
        assert!(!u.is_complete());
        let again = fill(&mut u);
        assert_eq!(again.len(), 8);
        assert_eq!(again[..], chunks(&blob(), &data)[..8]);
    }

    #[test]
    fn an_empty_blob_is_one_empty_chunk() {
        let mut u = UploadWindow::new(blob(), Arc::new(Vec::new()), 8);
        assert!(u.is_empty());
        let c = fill(&mut u);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].offset, c[0].total, c[0].bytes.len()), (0, 0, 0));
        assert_eq!(u.largest_stanza(), STANZA_OVERHEAD);
        u.acked();
        assert!(u.is_complete());
    }

    #[test]
    fn largest_stanza_is_the_base64_size_of_the_largest_chunk() {
        let mut u = UploadWindow::new(blob(), bytes(INLINE_LIMIT + 3), 1);
        assert_eq!(u.largest_stanza(), 0);
        u.next_chunk();
        assert_eq!(u.largest_stanza(), INLINE_LIMIT.div_ceil(3) * 4 + 256);
        u.acked();
        u.next_chunk(); // 3 bytes: smaller, the largest stays
        assert_eq!(u.largest_stanza(), INLINE_LIMIT.div_ceil(3) * 4 + 256);
    }

    #[test]
    fn a_window_of_0_still_progresses() {
        let mut u = UploadWindow::new(blob(), bytes(10), 0);
        assert!(u.next_chunk().is_some());
        assert!(u.next_chunk().is_none());
    }

    proptest! {
        /// Whatever the size, window and order of acknowledgements (acks are delivered in
        /// random batches), the window holds, the chunks are `chunks()` in order, and the
        /// upload completes exactly at the last acknowledgement; a restart at a random point
        /// sends everything again.
        #[test]
        fn window_order_and_completion(
            len in 0usize..(6 * INLINE_LIMIT),
            window in 1usize..10,
            batches in proptest::collection::vec(1usize..10, 1..40),
            restart_at in proptest::option::of(0usize..10),
        ) {
            let data = bytes(len);
            let expected = chunks(&blob(), &data);
            let mut u = UploadWindow::new(blob(), data, window);
            prop_assert_eq!(u.chunk_count(), expected.len());
            let mut restarted = restart_at.is_none();
            let mut sent: Vec<Chunk> = Vec::new();
            let mut step = 0;
            loop {
                sent.extend(fill(&mut u));
                prop_assert!(u.in_flight() <= window);
                if !restarted && Some(step) == restart_at {
                    u.restart();
                    restarted = true;
                    sent.clear();
                    continue;
                }
                let n = batches[step % batches.len()].min(u.in_flight());
                for _ in 0..n {
                    prop_assert!(!u.is_complete());
                    u.acked();
                }
                if u.is_complete() {
                    break;
                }
                step += 1;
            }
            prop_assert_eq!(sent, expected);
        }
    }
}
