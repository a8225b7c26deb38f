//! The one writer of a connection's replies: request tasks finish in any order and
//! queue their [`Reply`]; this task writes them out, each header and body (and several
//! queued replies at once) in a single vectored write. A read answered from files goes
//! through the connection's pipe instead, header and pieces, with the small replies
//! queued after it ([`crate::splice`]).

use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::reply::Reply;
use crate::splice::SpliceSink;

/// Replies gathered into one vectored write when several are queued: amortises the
/// system call under a deep queue while staying far below the kernel's IOV_MAX (1024).
const WRITE_BATCH: usize = 32;

/// Replies up to this size (header and body) that follow a file reply are copied into
/// its pipe rather than sending the pipe first: an error, a short read, a status.
const INTO_PIPE: usize = 4096 + 64;

/// Writes every reply received on `replies` to `sink` until all senders are gone, then
/// shuts the sink down. Each reply is dropped (its buffer returned, its permits
/// released) once written.
pub async fn write_replies<W: AsyncWrite + Unpin>(
    mut sink: W,
    mut replies: mpsc::Receiver<Reply>,
    mut splice: Option<SpliceSink>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while replies.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        write_batch(&mut sink, &batch, splice.as_mut()).await?;
        batch.clear();
    }
    sink.shutdown().await
}

/// Writes `batch` in order. Without a splice sink, every reply's parts are gathered
/// into vectored writes. With one, a read answered from files goes through the pipe,
/// header and pieces; replies after it join it there while they are small, so that a
/// run of cached reads reaches the socket in few large sends; a larger one sends the
/// pipe first and is written from memory.
async fn write_batch<W: AsyncWrite + Unpin>(
    sink: &mut W,
    batch: &[Reply],
    mut splice: Option<&mut SpliceSink>,
) -> io::Result<()> {
    let mut storage = [IoSlice::new(&[]); 2 * WRITE_BATCH];
    let mut count = 0;
    // Bytes are either gathered in `storage` or in the pipe, never in both: one is
    // sent before the other takes more.
    for reply in batch {
        let (head, body) = (reply.head(), reply.body());
        match (splice.as_deref_mut(), reply.file_parts()) {
            (Some(pipe), Some(parts)) => {
                write_all(sink, &mut storage[..count]).await?;
                sink.flush().await?;
                count = 0;
                pipe.put_bytes(head).await?;
                for (part_head, pieces) in parts {
                    pipe.put_bytes(&part_head).await?;
                    pipe.put_files(pieces).await?;
                }
            }
            (Some(pipe), None) if pipe.pending() > 0 && head.len() + body.len() <= INTO_PIPE => {
                pipe.put_bytes(head).await?;
                pipe.put_bytes(body).await?;
            }
            // The request side makes file replies only for a connection with a sink.
            (None, Some(_)) => return Err(io::Error::other("a file reply without a splice sink")),
            (pipe, None) => {
                if let Some(pipe) = pipe {
                    pipe.flush(true).await?;
                }
                for part in [head, body] {
                    if !part.is_empty() {
                        storage[count] = IoSlice::new(part);
                        count += 1;
                    }
                }
            }
        }
    }
    write_all(sink, &mut storage[..count]).await?;
    if let Some(pipe) = splice {
        pipe.flush(false).await?;
    }
    sink.flush().await
}

async fn write_all<W: AsyncWrite + Unpin>(
    sink: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let written = sink.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Framing;
    use lazyblk_image::BufferPool;

    #[tokio::test]
    async fn replies_are_written_whole_and_in_queue_order() {
        let (tx, rx) = mpsc::channel(8);
        let pool = BufferPool::new();
        let mut data = pool.take(5);
        data.copy_from_slice(b"hello");
        tx.send(Reply::data(Framing::Simple, 1, 0, data))
            .await
            .expect("open");
        tx.send(Reply::done(2)).await.expect("open");
        drop(tx);
        let mut out = Vec::new();
        write_replies(&mut out, rx, None).await.expect("written");
        let mut expected = crate::proto::simple_reply(0, 1).to_vec();
        expected.extend_from_slice(b"hello");
        expected.extend_from_slice(&crate::proto::simple_reply(0, 2));
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn partial_writes_are_resumed() {
        let (client, mut server) = tokio::io::duplex(7);
        let (tx, rx) = mpsc::channel(8);
        let pool = BufferPool::new();
        let mut data = pool.take(1000);
        data.fill(0xab);
        tx.send(Reply::data(Framing::Simple, 1, 0, data))
            .await
            .expect("open");
        drop(tx);
        let writer = tokio::spawn(write_replies(client, rx, None));
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut server, &mut out)
            .await
            .expect("read");
        writer.await.expect("joined").expect("written");
        assert_eq!(out.len(), 16 + 1000);
        assert!(out[16..].iter().all(|&b| b == 0xab));
    }
}
