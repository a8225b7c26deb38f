//! Reading whole protocol messages off a socket: a clean end of stream between messages
//! is told apart from a message cut short, and unwanted payloads are skipped without
//! buffering them.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Chunk size for skipping payloads: stack-sized, so skipping never allocates.
const SKIP_CHUNK: usize = 8 << 10;

/// Fills `buf` from `reader`. `Ok(false)` when the stream ended before the first byte
/// (the peer closed between messages); an `UnexpectedEof` error when it ended inside.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "stream ended {filled} bytes into a {}-byte message",
                        buf.len()
                    ),
                ))
            }
            n => filled += n,
        }
    }
    Ok(true)
}

/// Reads and drops `len` bytes.
pub async fn skip<R: AsyncRead + Unpin>(reader: &mut R, mut len: u64) -> io::Result<()> {
    let mut scratch = [0u8; SKIP_CHUNK];
    while len > 0 {
        let want = len.min(SKIP_CHUNK as u64) as usize;
        let n = reader.read(&mut scratch[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended with {len} payload bytes still due"),
            ));
        }
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn end_between_messages_is_clean() {
        let mut buf = [0u8; 4];
        let mut empty: &[u8] = &[];
        assert!(!read_message(&mut empty, &mut buf).await.expect("clean end"));
    }

    #[tokio::test]
    async fn end_inside_a_message_is_an_error() {
        let mut buf = [0u8; 4];
        let mut short: &[u8] = &[1, 2];
        let error = read_message(&mut short, &mut buf)
            .await
            .expect_err("truncated");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn whole_messages_are_read() {
        let mut buf = [0u8; 3];
        let mut data: &[u8] = &[1, 2, 3, 4];
        assert!(read_message(&mut data, &mut buf).await.expect("read"));
        assert_eq!(buf, [1, 2, 3]);
        assert_eq!(data, &[4]);
    }

    #[tokio::test]
    async fn skip_consumes_exactly_len() {
        let source = vec![9u8; SKIP_CHUNK * 2 + 5];
        let mut data: &[u8] = &source;
        skip(&mut data, (SKIP_CHUNK * 2 + 1) as u64)
            .await
            .expect("skipped");
        assert_eq!(data.len(), 4);
        let error = skip(&mut data, 10).await.expect_err("short");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
