//! The write buffer of one socket, which holds memory only while it has
//! something to write.
//!
//! Frames are coalesced so a burst costs one syscall, not one each; that is
//! what tokio's `BufWriter` gives, but it allocates its whole capacity up
//! front and keeps it for the connection's life. Most connections of a
//! chat server are idle most of the time, and a burst (a reconnect storm's
//! presence, a sync) would leave every connection holding the largest
//! buffer it ever needed. Here the buffer grows to fit what is written, up
//! to `limit` bytes, and a flush gives back anything above [`KEEP`], so an
//! idle connection holds at most that.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// Capacity kept across flushes: a steady stream of small frames (a chat
/// message, an ack) reuses it instead of allocating per flush.
pub(super) const KEEP: usize = 1024;

pub(super) struct WriteBuffer<W> {
    inner: W,
    buf: Vec<u8>,
    /// How much of `buf` the socket has taken.
    written: usize,
    /// Most bytes held before they are written; a larger write goes
    /// straight to the socket.
    limit: usize,
}

impl<W: AsyncWrite + Unpin> WriteBuffer<W> {
    pub(super) fn new(inner: W, limit: usize) -> Self {
        WriteBuffer {
            inner,
            buf: Vec::new(),
            written: 0,
            limit,
        }
    }

    /// Bytes allocated now (for tests: what an idle connection holds).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Hand everything buffered to the socket, then release the memory a
    /// burst needed.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WriteBuffer<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.len() + total > this.limit {
            ready!(this.poll_drain(cx))?;
        }
        if total >= this.limit {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        this.buf.reserve(total);
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket that records each write it is given, taking at most
    /// `max_write` bytes at a time (as a full kernel buffer would).
    #[derive(Default)]
    struct Socket {
        writes: Vec<Vec<u8>>,
        max_write: Option<usize>,
        flushed: usize,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.max_write.map_or(data.len(), |m| m.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushed += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_burst_is_one_write_and_its_memory_is_given_back_on_flush() {
        let mut w = WriteBuffer::new(Socket::default(), 16 * 1024);
        assert_eq!(w.capacity(), 0, "nothing is allocated before a write");
        for i in 0..40u8 {
            w.write_all(&[i; 100]).await.unwrap();
        }
        assert!(w.inner.writes.is_empty(), "held until the flush");
        assert!(w.capacity() >= 4000);
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes.len(), 1, "one write for the burst");
        let expected: Vec<u8> = (0..40u8).flat_map(|i| [i; 100]).collect();
        assert_eq!(w.inner.writes[0], expected);
        assert_eq!(w.inner.flushed, 1);
        assert_eq!(w.capacity(), 0, "a burst's buffer is released");
    }

    #[tokio::test]
    async fn small_frames_keep_a_small_buffer_across_flushes() {
        let mut w = WriteBuffer::new(Socket::default(), 16 * 1024);
        w.write_all(&[1; 200]).await.unwrap();
        w.flush().await.unwrap();
        let kept = w.capacity();
        assert!(kept > 0 && kept <= KEEP, "kept {kept}");
        w.write_all(&[2; 200]).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.capacity(), kept, "reused, not reallocated");
        assert_eq!(w.inner.writes, vec![vec![1; 200], vec![2; 200]]);
    }

    #[tokio::test]
    async fn never_holds_more_than_its_limit() {
        let mut w = WriteBuffer::new(Socket::default(), 1000);
        for i in 0..5u8 {
            w.write_all(&[i; 300]).await.unwrap();
            assert!(w.buf.len() <= 1000);
        }
        // Three frames fit (900 bytes); the fourth drained them first.
        assert_eq!(w.inner.writes.len(), 1);
        assert_eq!(w.inner.writes[0].len(), 900);
        // Larger than the limit: straight to the socket, after what was held.
        w.write_all(&[9; 2500]).await.unwrap();
        assert_eq!(w.inner.writes.len(), 3);
        assert_eq!(w.inner.writes[1].len(), 600);
        assert_eq!(w.inner.writes[2], vec![9; 2500]);
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes.len(), 3, "nothing left to write");
    }

    #[tokio::test]
    async fn a_socket_that_takes_part_of_a_write_gets_the_rest_in_order() {
        let mut w = WriteBuffer::new(
            Socket {
                max_write: Some(7),
                ..Socket::default()
            },
            16 * 1024,
        );
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes.concat(), data);
        assert!(w.inner.writes.iter().all(|c| c.len() <= 7));
    }

    #[tokio::test]
    async fn vectored_writes_are_coalesced_too() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut w = WriteBuffer::new(client, 16 * 1024);
        let n = w
            .write_vectored(&[IoSlice::new(b"head"), IoSlice::new(b"payload")])
            .await
            .unwrap();
        assert_eq!(n, 11);
        w.write_all(b"!").await.unwrap();
        w.flush().await.unwrap();
        let mut got = [0u8; 12];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headpayload!");
    }
}
