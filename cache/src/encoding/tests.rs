//! Encode, decode and stream-verify stored chunks, bombs and lies included.

use super::*;

fn text(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"lazyblk chunk "[i % 14]).collect()
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn verify_streaming(
    stored: &[u8],
    limit: u64,
    digest: &Digest,
    piece: usize,
) -> Result<(Encoding, u64), DecodeError> {
    let mut v = StoredVerifier::new(limit);
    for p in stored.chunks(piece.max(1)) {
        v.update(p);
    }
    v.finish(digest)
}

#[test]
fn compressible_chunks_are_stored_as_a_frame_and_decode_back() {
    let raw = text(1 << 20);
    let digest = Digest::of(&raw);
    let (encoding, stored) = encode_frame(&raw);
    assert_eq!(encoding, Encoding::Zstd);
    assert!(stored.len() < raw.len() / 10);
    let (got, bytes) = decode(Bytes::copy_from_slice(&stored), raw.len(), &digest).unwrap();
    assert_eq!(got, Encoding::Zstd);
    assert_eq!(&bytes[..], &raw[..]);
    for piece in [1, 3, 4096, 1 << 20] {
        assert_eq!(
            verify_streaming(&stored, 1 << 20, &digest, piece),
            Ok((Encoding::Zstd, 1 << 20))
        );
    }
}

#[test]
fn incompressible_chunks_stay_raw() {
    let raw = random(1 << 20);
    let digest = Digest::of(&raw);
    let (encoding, stored) = encode_frame(&raw);
    assert_eq!(encoding, Encoding::Raw);
    assert_eq!(&stored[..], &raw[..]);
    assert_eq!(
        decode(Bytes::from(raw.clone()), raw.len(), &digest)
            .unwrap()
            .0,
        Encoding::Raw
    );
    assert_eq!(
        verify_streaming(&raw, 1 << 20, &digest, 65536),
        Ok((Encoding::Raw, 1 << 20))
    );
}

#[test]
fn a_raw_chunk_that_begins_with_the_magic_is_raw() {
    // A format-1 store's chunk holding the start of a .zst file.
    let mut raw = zstd::bulk::compress(&text(1 << 16), 3).unwrap();
    raw.extend_from_slice(&random(4096));
    let digest = Digest::of(&raw);
    let (encoding, bytes) = decode(Bytes::from(raw.clone()), raw.len(), &digest).unwrap();
    assert_eq!(encoding, Encoding::Raw);
    assert_eq!(&bytes[..], &raw[..]);
    assert_eq!(
        verify_streaming(&raw, raw.len() as u64, &digest, 1000),
        Ok((Encoding::Raw, raw.len() as u64))
    );
}

#[test]
fn a_corrupt_frame_is_refused() {
    let raw = text(1 << 20);
    let digest = Digest::of(&raw);
    let mut stored = encode_frame(&raw).1.into_owned();
    let middle = stored.len() / 2;
    stored[middle] ^= 0x55;
    assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
    assert!(verify_streaming(&stored, 1 << 20, &digest, 4096).is_err());
    // Cut short.
    let short = &stored[..stored.len() - 10];
    assert!(decode(Bytes::copy_from_slice(short), raw.len(), &digest).is_err());
    assert!(verify_streaming(short, 1 << 20, &digest, 4096).is_err());
}

#[test]
fn a_frame_that_decodes_past_the_chunk_is_refused_without_allocating_it() {
    // 1 GiB of zeros in a few kilobytes, offered as a 1 MiB chunk.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    assert!(bomb.len() < 1 << 20);
    let digest = Digest::of(&zeros);
    let refused = decode(Bytes::from(bomb.clone()), 1 << 20, &digest);
    assert!(
        matches!(refused, Err(DecodeError::BadFrame { .. })),
        "{refused:?}"
    );
    let streamed = verify_streaming(&bomb, 1 << 20, &digest, 65536);
    assert!(
        matches!(streamed, Err(DecodeError::BadFrame { .. })),
        "{streamed:?}"
    );
}

#[test]
fn both_decoders_refuse_what_the_other_refuses() {
    let raw = text(1 << 18);
    let digest = Digest::of(&raw);
    let frame = encode_frame(&raw).1.into_owned();
    // Two frames of the chunk's halves: one chunk, but not one frame.
    let mut two = zstd::bulk::compress(&raw[..1 << 17], 3).unwrap();
    two.extend(zstd::bulk::compress(&raw[1 << 17..], 3).unwrap());
    // A skippable frame after the chunk's frame.
    let mut skippable = frame.clone();
    skippable.extend_from_slice(&[0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4]);
    // A frame of random bytes, larger than the chunk it holds.
    let noise = random(1 << 16);
    let big = zstd::bulk::compress(&noise, 1).unwrap();
    assert!(big.len() >= noise.len());
    for (body, len, digest) in [
        (&two, raw.len(), digest),
        (&skippable, raw.len(), digest),
        (&big, noise.len(), Digest::of(&noise)),
    ] {
        assert!(decode(Bytes::copy_from_slice(body), len, &digest).is_err());
        assert!(verify_streaming(body, 1 << 24, &digest, 4096).is_err());
    }
    // Empty pieces between the bytes change nothing.
    let mut v = StoredVerifier::new(1 << 24);
    for piece in frame.chunks(100) {
        for _ in 0..20 {
            v.update(&[]);
        }
        v.update(piece);
    }
    assert_eq!(v.finish(&digest), Ok((Encoding::Zstd, 1 << 18)));
}

#[test]
fn a_block_slot_of_two_frames_is_refused_by_both_decoders() {
    let raw = text(16384);
    let digest = Digest::of(&raw);
    let block = crate::blocks::STORED_BLOCK as usize;
    // Two blocks; the first slot holds two frames (of its halves), the second one.
    let mut first = zstd::bulk::compress(&raw[..block / 2], 3).unwrap();
    first.extend(zstd::bulk::compress(&raw[block / 2..block], 3).unwrap());
    let second = zstd::bulk::compress(&raw[block..], 3).unwrap();
    let mut stored = Vec::new();
    stored.extend_from_slice(&crate::blocks::BLOCKS_MAGIC);
    stored.extend_from_slice(&20u32.to_le_bytes());
    stored.extend_from_slice(b"LZBK");
    stored.extend_from_slice(&(block as u32).to_le_bytes());
    stored.extend_from_slice(&2u32.to_le_bytes());
    stored.extend_from_slice(&(first.len() as u32).to_le_bytes());
    stored.extend_from_slice(&(second.len() as u32).to_le_bytes());
    stored.extend_from_slice(&first);
    stored.extend_from_slice(&second);
    assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
    assert!(verify_streaming(&stored, 16 << 20, &digest, 100).is_err());
}

#[test]
fn bytes_after_the_frame_are_refused() {
    let raw = text(1 << 18);
    let digest = Digest::of(&raw);
    let mut stored = encode_frame(&raw).1.into_owned();
    stored.extend_from_slice(b"trailing");
    assert!(decode(Bytes::from(stored.clone()), raw.len(), &digest).is_err());
    assert!(verify_streaming(&stored, 1 << 18, &digest, 7).is_err());
}

#[test]
fn chunks_are_stored_in_blocks_that_decode_whole_and_alone() {
    let mut raw = text(1 << 20);
    raw[..1 << 16].copy_from_slice(&random(1 << 16));
    let digest = Digest::of(&raw);
    let (encoding, stored) = encode(&raw);
    assert_eq!(encoding, Encoding::Blocks);
    assert!(stored.len() < raw.len() / 5, "{}", stored.len());
    let (got, bytes) = decode(Bytes::copy_from_slice(&stored), raw.len(), &digest).unwrap();
    assert_eq!(got, Encoding::Blocks);
    assert_eq!(&bytes[..], &raw[..]);
    for piece in [1, 7, 4096, 20000, 1 << 20] {
        assert_eq!(
            verify_streaming(&stored, 16 << 20, &digest, piece),
            Ok((Encoding::Blocks, 1 << 20)),
            "piece {piece}"
        );
    }
    // Each block decodes on its own from its range of the stored bytes.
    let table = crate::blocks::BlockTable::parse(&stored, Some(1 << 20), 1 << 20).unwrap();
    assert_eq!(
        table.count(),
        (1 << 20) / crate::blocks::STORED_BLOCK as usize
    );
    for i in [0, 3, 63] {
        let frame = &stored[table.offsets[i] as usize..table.offsets[i + 1] as usize];
        let mut out = vec![0u8; table.block_len(i, 1 << 20)];
        with_decompressor(|d| crate::blocks::decode_block(frame, &mut out, d)).unwrap();
        let at = i * crate::blocks::STORED_BLOCK as usize;
        assert_eq!(&out[..], &raw[at..at + out.len()]);
    }
    // The stored bytes are a zstd stream: `zstd -d` decodes them.
    let mut decoder = zstd::stream::Decoder::new(&stored[..]).unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut decoder, &mut all).unwrap();
    assert_eq!(all, raw);
}

#[test]
fn a_short_last_block_and_a_corrupt_block_are_told_apart() {
    let raw = text((1 << 20) - 12288);
    let digest = Digest::of(&raw);
    let stored = encode(&raw).1.into_owned();
    assert_eq!(
        decode(Bytes::from(stored.clone()), raw.len(), &digest)
            .unwrap()
            .0,
        Encoding::Blocks
    );
    assert_eq!(
        verify_streaming(&stored, 16 << 20, &digest, 999),
        Ok((Encoding::Blocks, raw.len() as u64))
    );
    let table = crate::blocks::BlockTable::parse(&stored, Some(raw.len() as u64), 1 << 20).unwrap();
    let mut bad = stored.clone();
    let at = table.offsets[10] as usize + 5;
    bad[at] ^= 0x40;
    assert!(decode(Bytes::from(bad.clone()), raw.len(), &digest).is_err());
    assert!(verify_streaming(&bad, 16 << 20, &digest, 4096).is_err());
    // Cut short, or with bytes after the last block.
    assert!(verify_streaming(&stored[..stored.len() - 1], 16 << 20, &digest, 4096).is_err());
    let mut long = stored.clone();
    long.push(0);
    assert!(decode(Bytes::from(long.clone()), raw.len(), &digest).is_err());
    assert!(verify_streaming(&long, 16 << 20, &digest, 4096).is_err());
}

#[test]
fn a_block_that_decodes_past_its_size_is_refused_without_allocating_it() {
    // A table of one block of 16 KiB whose frame holds 1 GiB of zeros.
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
    }
    let bomb = encoder.finish().unwrap();
    let block = crate::blocks::STORED_BLOCK;
    let mut stored = Vec::new();
    stored.extend_from_slice(&crate::blocks::BLOCKS_MAGIC);
    stored.extend_from_slice(&16u32.to_le_bytes());
    stored.extend_from_slice(b"LZBK");
    stored.extend_from_slice(&block.to_le_bytes());
    stored.extend_from_slice(&1u32.to_le_bytes());
    stored.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
    stored.extend_from_slice(&bomb);
    let digest = Digest::of(&zeros[..block as usize]);
    let refused = decode(Bytes::from(stored.clone()), block as usize, &digest);
    assert!(
        matches!(refused, Err(DecodeError::BadFrame { .. })),
        "{refused:?}"
    );
    let streamed = verify_streaming(&stored, 16 << 20, &digest, 4096);
    assert!(
        matches!(streamed, Err(DecodeError::BadFrame { .. })),
        "{streamed:?}"
    );
    let mut out = vec![0u8; block as usize];
    assert!(with_decompressor(|d| crate::blocks::decode_block(&bomb, &mut out, d)).is_err());
}
