//! The batched writer of thingport's internal connections: gateway ↔ worker links (both ends) and worker ↔ worker
//! peer connections. Frames queued by many tasks leave in as few write calls as possible, and a large frame's bytes
//! are written from where they lie, never copied into a batch buffer.
//!
//! - [`Batch`] holds what one write carries as a list of `Bytes`, written with vectored writes
//!   (`write_all_buf`, which calls `writev` with up to 64 buffers). A piece shorter than [`BY_REFERENCE`] bytes
//!   (a routing header, an acknowledgement, a 48-byte telemetry frame) is appended to the batch's own contiguous
//!   buffer instead: copying it costs less than the `iovec` entry it would take, and 64 entries of a few dozen bytes
//!   would cap a write at a few kilobytes.
//! - [`gather`] fills a batch from a queue under a [`Flush`] policy: it takes every frame already queued at once,
//!   and may wait a bounded time for more.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Pieces at least this long are written by reference; shorter ones are copied into the batch's buffer.
pub const BY_REFERENCE: usize = 512;

/// What one write carries: pieces in order, the short ones gathered into contiguous runs.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sealed pieces, in order, before `tail`.
    sealed: VecDeque<Bytes>,
    /// The run of short pieces being appended to.
    tail: BytesMut,
    /// Bytes in `sealed` and `tail` (what [`Buf::remaining`] says while the batch is written).
    len: usize,
    /// Items put into the batch by [`gather`].
    pub frames: usize,
    /// What they weigh, as [`gather`]'s `put` says (a gateway counts its device frames' bytes).
    pub weight: usize,
}

impl Batch {
    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes encoded in place (a header, a short frame).
    pub fn encode(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        let before = self.tail.len();
        encode(&mut self.tail);
        self.len += self.tail.len() - before;
    }

    /// Appends a piece: by reference if it is long, else copied.
    pub fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        if piece.len() < BY_REFERENCE {
            self.tail.extend_from_slice(&piece);
            return;
        }
        self.seal();
        self.sealed.push_back(piece);
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.sealed.push_back(self.tail.split().freeze());
        }
    }

    /// Writes the whole batch and empties it. The buffer of short pieces is reused once the write is done.
    pub async fn write_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.seal();
        let written = writer.write_all_buf(self).await;
        self.sealed.clear();
        self.len = 0;
        self.frames = 0;
        self.weight = 0;
        written
    }
}

impl Buf for Batch {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.sealed.front().map_or(&self.tail[..], |b| &b[..])
    }

    fn advance(&mut self, mut n: usize) {
        assert!(n <= self.len, "advance past the end of a batch");
        self.len -= n;
        while n > 0 {
            let Some(front) = self.sealed.front_mut() else {
                self.tail.advance(n);
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.sealed.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let pieces = self.sealed.iter().map(|b| &b[..]).chain(std::iter::once(&self.tail[..]));
        let mut n = 0;
        for (slot, piece) in dst.iter_mut().zip(pieces.filter(|p| !p.is_empty())) {
            *slot = IoSlice::new(piece);
            n += 1;
        }
        n
    }
}

/// When a writer writes: at once when `bytes` are gathered, else when the first frame has waited `delay`; never
/// more than `max_bytes` in one batch (a frame is not split, so a batch may pass it by one frame).
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub delay: Duration,
    pub bytes: usize,
    pub max_bytes: usize,
}

impl Flush {
    /// Write whatever is queued, waiting for nothing.
    pub const fn now(max_bytes: usize) -> Flush {
        Flush { delay: Duration::ZERO, bytes: max_bytes, max_bytes }
    }
}

/// The most items one batch takes. Some items weigh nothing in the batch (a worker's `STORED` answers, folded only
/// when the batch is written), so bytes alone would not end a batch while senders keep the queue full.
pub const MAX_FRAMES: usize = 4_096;

/// Puts `first` and what follows it in the queue into `batch` with `put` (which returns what the item weighs),
/// under the flush policy: items that are queued are taken at once; then, until `policy.delay` has passed since
/// `first` was taken (or `policy.bytes` are gathered), items that arrive are waited for and taken too.
pub async fn gather<T>(
    rx: &mut mpsc::Receiver<T>,
    first: T,
    batch: &mut Batch,
    policy: Flush,
    mut put: impl FnMut(T, &mut Batch) -> usize,
) {
    let deadline = tokio::time::Instant::now() + policy.delay;
    // The sender that woke this task is still running, and others may be ready behind it: go to the back of the
    // run queue once so their frames join this write. (A woken task otherwise runs next, which made every write
    // carry a single frame.)
    if rx.is_empty() {
        tokio::task::yield_now().await;
    }
    let mut item = Some(first);
    let mut timer = None;
    loop {
        while let Some(outgoing) = item {
            batch.weight += put(outgoing, batch);
            batch.frames += 1;
            let room = batch.len() < policy.max_bytes && batch.frames < MAX_FRAMES;
            item = if room { rx.try_recv().ok() } else { None };
        }
        if batch.len() >= policy.bytes.min(policy.max_bytes)
            || batch.frames >= MAX_FRAMES
            || policy.delay.is_zero()
        {
            return;
        }
        // one timer for the whole batch, made only when the batch waits
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        tokio::select! {
            biased;
            next = rx.recv() => match next {
                Some(next) => item = Some(next),
                None => return, // the queue closed
            },
            () = timer.as_mut() => return, // the first frame has waited long enough
        }
    }
}

/// Puts an encoded frame into a batch; it weighs nothing.
pub fn push(frame: Bytes, batch: &mut Batch) -> usize {
    batch.push(frame);
    0
}

/// Writes what `rx` carries to `writer`, many frames per write, until the queue closes or a write fails.
pub async fn write_queue<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Bytes>,
    policy: Flush,
) {
    let mut batch = Batch::default();
    while let Some(first) = rx.recv().await {
        gather(&mut rx, first, &mut batch, policy, push).await;
        if batch.write_to(&mut writer).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

    use super::*;

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    #[tokio::test]
    async fn a_batch_writes_its_pieces_in_order_copying_only_the_short_ones() {
        let mut batch = Batch::default();
        batch.encode(|b| b.extend_from_slice(b"h1"));
        let long = frame(1, BY_REFERENCE);
        batch.push(long.clone());
        batch.push(frame(2, 3));
        batch.encode(|b| b.extend_from_slice(b"h2"));
        batch.push(frame(3, 2 * BY_REFERENCE));
        assert_eq!(batch.len(), 2 + BY_REFERENCE + 3 + 2 + 2 * BY_REFERENCE);
        batch.seal();
        let mut slices = [IoSlice::new(&[]); 8];
        let n = batch.chunks_vectored(&mut slices);
        assert_eq!(n, 4, "h1 | long | (3 bytes, h2) | long");
        assert_eq!(
            slices[1].as_ptr(),
            long.as_ptr(),
            "the long piece is written from where it lies"
        );

        let mut out = Vec::new();
        batch.write_to(&mut out).await.unwrap();
        let mut expected = b"h1".to_vec();
        expected.extend_from_slice(&long);
        expected.extend_from_slice(&[2, 2, 2]);
        expected.extend_from_slice(b"h2");
        expected.extend_from_slice(&frame(3, 2 * BY_REFERENCE));
        assert_eq!(out, expected);
        assert!(batch.is_empty());
        assert_eq!(batch.remaining(), 0);
    }

    #[tokio::test]
    async fn a_batch_survives_writes_that_take_a_few_bytes_at_a_time() {
        use tokio::io::AsyncReadExt;
        let (mut writer, mut reader) = tokio::io::duplex(7);
        let pieces = [frame(1, 3), frame(2, BY_REFERENCE + 5), frame(3, 2), frame(4, BY_REFERENCE)];
        let expected: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
        let mut batch = Batch::default();
        for piece in pieces {
            batch.push(piece);
        }
        let read = tokio::spawn(async move {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).await.unwrap();
            out
        });
        batch.write_to(&mut writer).await.unwrap();
        drop(writer);
        assert_eq!(read.await.unwrap(), expected);
    }

    #[test]
    fn advancing_part_way_through_a_piece_resumes_inside_it() {
        let mut batch = Batch::default();
        batch.push(frame(1, BY_REFERENCE));
        batch.push(frame(2, 10));
        batch.seal();
        batch.advance(BY_REFERENCE - 1);
        assert_eq!(batch.chunk(), &[1]);
        batch.advance(5);
        assert_eq!(batch.chunk(), &[2; 6]);
        assert_eq!(batch.remaining(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn items_that_weigh_nothing_still_end_a_batch_at_max_frames() {
        let (tx, mut rx) = mpsc::channel(MAX_FRAMES + 10);
        for _ in 0..MAX_FRAMES + 10 {
            tx.try_send(()).unwrap();
        }
        let mut batch = Batch::default();
        let policy = Flush { delay: Duration::from_secs(60), bytes: 1 << 20, max_bytes: 1 << 20 };
        let weightless = |(), _: &mut Batch| 0;
        rx.recv().await.unwrap();
        let started = tokio::time::Instant::now();
        gather(&mut rx, (), &mut batch, policy, weightless).await;
        assert_eq!((batch.frames, rx.len()), (MAX_FRAMES, 10));
        assert_eq!(started.elapsed(), Duration::ZERO, "ended by the count, not the delay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_waits_at_most_the_flush_delay_for_more_frames() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut batch = Batch::default();
        // tokio's timers count whole milliseconds
        let policy = Flush { delay: Duration::from_millis(5), bytes: 1 << 20, max_bytes: 1 << 20 };
        let started = tokio::time::Instant::now();
        let sender = tokio::spawn(async move {
            for n in 1..=3 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.send(frame(n, 4)).await.unwrap();
            }
            // after the deadline: the next write's
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(frame(4, 4)).await.unwrap();
        });
        gather(&mut rx, frame(0, 4), &mut batch, policy, push).await;
        assert_eq!(batch.frames, 4, "the first and the three that came within the delay");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(5),
            "written when the first had waited the delay"
        );
        batch.write_to(&mut Vec::new()).await.unwrap();
        let next = rx.recv().await.unwrap();
        gather(&mut rx, next, &mut batch, policy, push).await;
        assert_eq!(batch.frames, 1);
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_goes_at_once_when_it_holds_flush_bytes_or_the_delay_is_zero() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut batch = Batch::default();
        tx.send(frame(1, 4)).await.unwrap();
        let started = tokio::time::Instant::now();
        let policy = Flush { delay: Duration::from_secs(1), bytes: 4, max_bytes: 1 << 20 };
        gather(&mut rx, frame(0, 4), &mut batch, policy, push).await;
        assert_eq!(batch.frames, 2);
        assert_eq!(started.elapsed(), Duration::ZERO);
        batch.write_to(&mut Vec::new()).await.unwrap();
        gather(&mut rx, frame(0, 4), &mut batch, Flush::now(1 << 20), push).await;
        assert_eq!(batch.frames, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_batch_stops_taking_frames_past_its_bound() {
        let (tx, mut rx) = mpsc::channel(16);
        for n in 1..=9 {
            tx.send(frame(n, 100)).await.unwrap();
        }
        let mut batch = Batch::default();
        gather(&mut rx, frame(0, 100), &mut batch, Flush::now(250), push).await;
        assert_eq!(
            (batch.frames, batch.len()),
            (3, 300),
            "two frames, and the one that passed the bound"
        );
        assert_eq!(rx.len(), 7);
    }
}
