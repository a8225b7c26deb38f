//! A chunk stored in blocks (format 3): every [`STORED_BLOCK`] bytes of the chunk are
//! a zstd frame of their own, after a table of the frames' sizes, so a reader can fetch
//! and decode a byte range of the stored object that holds only the blocks it reads.
//!
//! The layout is a valid zstd stream: the table is a skippable frame (which `zstd -d`
//! passes over), then one frame per block, in order:
//!
//! ```text
//! 5B 2A 4D 18 | payload length (u32 LE) | "LZBK" | block size (u32 LE) | block count (u32 LE)
//!             | stored size of each block's frame (u32 LE each)
//! frame of block 0 | frame of block 1 | ...
//! ```
//!
//! Nothing in the table is trusted: a whole chunk is verified against its digest after
//! decoding, and a block against its sha256 in the manifest's block index
//! ([`crate::manifest::BlockIndex`]); a table that lies only makes those checks fail.
//! Every frame is decoded into a buffer of exactly its block's length, so a frame that
//! would decode past it (a zstd bomb) fails without allocating more.

use crate::digest::DigestWriter;

/// Raw bytes per stored block: small enough that a lazy boot's scattered 4 KiB reads
/// fetch about what they read (measured on the demo's root file system: 1.7x the bytes
/// of the files read at 16 KiB, 2.6x at 32 KiB, 3.9x at 64 KiB), large enough that a
/// block still compresses (2.9x for those blocks) and a 1 MiB chunk has 64 of them.
pub const STORED_BLOCK: u32 = 8 << 10;

/// The largest window a stored frame may use: 16 MiB, the largest chunk. Both decoders
/// hold to it, so they accept the same frames, and a frame cannot make a decoder
/// allocate a larger window.
pub(crate) const WINDOW_LOG_MAX: u32 = 24;

/// The first bytes of a chunk stored in blocks: a zstd skippable frame's magic number.
pub(crate) const BLOCKS_MAGIC: [u8; 4] = [0x5B, 0x2A, 0x4D, 0x18];
const BLOCKS_TAG: [u8; 4] = *b"LZBK";
/// Most blocks in one chunk: 16 MiB in 4 KiB blocks.
const MAX_BLOCKS: u32 = 4096;
/// The largest block a table or a block index may name: what one block costs a reader
/// in memory (and the store while it verifies an upload) stays small.
pub const MAX_BLOCK: u32 = 64 << 10;

/// The largest frame a block of `block` bytes may be stored as: zstd's worst case for
/// incompressible input is a few bytes per 128 KiB over the input.
fn max_frame(block: u32) -> u32 {
    block + block / 128 + 64
}

/// Bytes of the table of a chunk of `count` blocks (the object's first bytes).
pub fn table_len(count: usize) -> usize {
    20 + 4 * count
}

/// Blocks of a chunk of `len` bytes.
pub fn block_count(len: u64, block: u32) -> usize {
    len.div_ceil(block as u64) as usize
}

/// A parsed table: where each block's frame lies in the stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTable {
    pub block_size: u32,
    /// `count + 1` offsets in the stored object: block `i`'s frame is
    /// `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<u64>,
}

impl BlockTable {
    /// Parses the table at the start of `stored` for a chunk of `len` raw bytes (`None`:
    /// any length up to `limit`, for the store, which does not know it). `Err` says why
    /// the bytes are not a table (then they may still be a raw chunk).
    pub fn parse(stored: &[u8], len: Option<u64>, limit: u64) -> Result<BlockTable, String> {
        let word = |at: usize| -> Option<u32> {
            stored
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if stored.get(..4) != Some(&BLOCKS_MAGIC[..]) || stored.get(8..12) != Some(&BLOCKS_TAG) {
            return Err("not a block table".into());
        }
        let (Some(payload), Some(block_size), Some(count)) = (word(4), word(12), word(16)) else {
            return Err("the block table is cut short".into());
        };
        if !block_size.is_power_of_two() || !(4096..=MAX_BLOCK).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is not a power of two of 4 to 64 KiB"
            ));
        }
        if count == 0 || count > MAX_BLOCKS || (count as u64 - 1) * block_size as u64 >= limit {
            return Err(format!(
                "{count} blocks of {block_size} bytes do not fit a chunk"
            ));
        }
        if let Some(len) = len {
            if block_count(len, block_size) != count as usize {
                return Err(format!(
                    "{count} blocks of {block_size} bytes, the chunk is {len} bytes"
                ));
            }
        }
        if payload as usize != table_len(count as usize) - 8 {
            return Err(format!(
                "a table payload of {payload} bytes for {count} blocks"
            ));
        }
        let mut offsets = Vec::with_capacity(count as usize + 1);
        let mut at = table_len(count as usize) as u64;
        offsets.push(at);
        for i in 0..count as usize {
            let Some(size) = word(20 + 4 * i) else {
                return Err("the block table is cut short".into());
            };
            if size == 0 || size > max_frame(block_size) {
                return Err(format!("block {i} is stored in {size} bytes"));
            }
            at += size as u64;
            offsets.push(at);
        }
        Ok(BlockTable {
            block_size,
            offsets,
        })
    }

    pub fn count(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The stored object's length.
    pub fn stored_len(&self) -> u64 {
        self.offsets[self.count()]
    }

    /// Raw length of block `i` of a chunk of `len` bytes.
    pub fn block_len(&self, i: usize, len: u64) -> usize {
        let start = i as u64 * self.block_size as u64;
        (len - start).min(self.block_size as u64) as usize
    }
}

/// The chunk stored in blocks of [`STORED_BLOCK`], or `None` when that is not smaller
/// than the raw bytes (then it is stored raw).
pub(crate) fn encode_blocks(
    raw: &[u8],
    compress: &mut zstd::bulk::Compressor<'static>,
) -> Option<Vec<u8>> {
    let block = STORED_BLOCK as usize;
    let count = block_count(raw.len() as u64, STORED_BLOCK);
    if count == 0 || count > MAX_BLOCKS as usize {
        return None;
    }
    let head = table_len(count);
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&BLOCKS_MAGIC);
    out.extend_from_slice(&((head - 8) as u32).to_le_bytes());
    out.extend_from_slice(&BLOCKS_TAG);
    out.extend_from_slice(&STORED_BLOCK.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.resize(head, 0);
    let mut frame = Vec::with_capacity(max_frame(STORED_BLOCK) as usize);
    for (i, piece) in raw.chunks(block).enumerate() {
        frame.clear();
        compress.compress_to_buffer(piece, &mut frame).ok()?;
        if out.len() + frame.len() >= raw.len() {
            return None;
        }
        out[20 + 4 * i..24 + 4 * i].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&frame);
    }
    Some(out)
}

/// Decodes one block's frame into `out` (exactly the block's length); `Err` when it is
/// not a frame of that many bytes.
pub(crate) fn decode_block(
    frame: &[u8],
    out: &mut [u8],
    decompress: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), String> {
    match decompress.decompress_to_buffer(frame, out) {
        Ok(n) if n == out.len() => {}
        Ok(n) => {
            return Err(format!(
                "a block frame decodes to {n} of {} bytes",
                out.len()
            ))
        }
        Err(e) => {
            return Err(format!(
                "a block frame does not decode into {} bytes: {e}",
                out.len()
            ))
        }
    }
    // One frame, nothing after it.
    if zstd::zstd_safe::find_frame_compressed_size(frame) != Ok(frame.len()) {
        return Err("bytes follow a block's frame".into());
    }
    Ok(())
}

/// Decodes a whole chunk stored in blocks (its `table` parsed) into `len` raw bytes.
pub(crate) fn decode_blocks(
    stored: &[u8],
    table: &BlockTable,
    len: usize,
    decompress: &mut zstd::bulk::Decompressor<'static>,
) -> Result<Vec<u8>, String> {
    if table.stored_len() != stored.len() as u64 {
        return Err(format!(
            "the table adds up to {} bytes, {} are stored",
            table.stored_len(),
            stored.len()
        ));
    }
    // Every byte is written below: each block's frame must fill its block exactly.
    let mut raw = crate::buffers::take_filled(len);
    let block = table.block_size as usize;
    for (i, out) in raw.chunks_mut(block).enumerate() {
        let frame = &stored[table.offsets[i] as usize..table.offsets[i + 1] as usize];
        decode_block(frame, out, decompress).map_err(|e| format!("block {i}: {e}"))?;
    }
    Ok(raw)
}

/// Verifies a chunk stored in blocks as its bytes stream by (see
/// [`crate::encoding::StoredVerifier`]): holds the table and one frame at a time.
pub(crate) struct BlocksState {
    limit: u64,
    head: Vec<u8>,
    table: Option<BlockTable>,
    /// The frame being gathered, and its index.
    frame: Vec<u8>,
    next: usize,
    out: Vec<u8>,
    decoder: Option<zstd::bulk::Decompressor<'static>>,
    pub(crate) decoded: DigestWriter,
    pub(crate) decoded_len: u64,
    pub(crate) failed: Option<String>,
}

impl BlocksState {
    pub(crate) fn new(limit: u64) -> BlocksState {
        BlocksState {
            limit,
            head: Vec::new(),
            table: None,
            frame: Vec::new(),
            next: 0,
            out: Vec::new(),
            decoder: None,
            decoded: DigestWriter::default(),
            decoded_len: 0,
            failed: None,
        }
    }

    pub(crate) fn feed(&mut self, mut input: &[u8]) {
        while self.failed.is_none() && !input.is_empty() {
            let Some(table) = &self.table else {
                // The table: its first 20 bytes say how long the rest is.
                let want = match self.head.get(16..20) {
                    Some(b) => table_len(
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]]).min(MAX_BLOCKS) as usize,
                    ),
                    None => 20,
                };
                let take = (want - self.head.len()).min(input.len());
                self.head.extend_from_slice(&input[..take]);
                input = &input[take..];
                let complete = self.head.get(16..20).is_some_and(|b| {
                    let count = u32::from_le_bytes([b[0], b[1], b[2], b[3]]).min(MAX_BLOCKS);
                    self.head.len() == table_len(count as usize)
                });
                if complete {
                    match BlockTable::parse(&self.head, None, self.limit) {
                        Ok(t) => self.table = Some(t),
                        Err(e) => self.failed = Some(e),
                    }
                }
                continue;
            };
            let Some(end) = table.offsets.get(self.next + 1) else {
                self.failed = Some("bytes follow the last block".into());
                return;
            };
            let size = (end - table.offsets[self.next]) as usize;
            let take = (size - self.frame.len()).min(input.len());
            self.frame.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.frame.len() == size {
                self.finish_frame();
            }
        }
    }

    /// Decodes the gathered frame, a full block except maybe the last.
    fn finish_frame(&mut self) {
        let Some(table) = &self.table else { return };
        let last = self.next + 1 == table.count();
        let block = table.block_size as usize;
        if self.decoder.is_none() {
            let made = zstd::bulk::Decompressor::new().and_then(|mut d| {
                d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))?;
                Ok(d)
            });
            match made {
                Ok(d) => self.decoder = Some(d),
                Err(e) => {
                    self.failed = Some(e.to_string());
                    return;
                }
            }
        }
        // Exactly one frame per block, as every reader requires (`decode_block`).
        if zstd::zstd_safe::find_frame_compressed_size(&self.frame) != Ok(self.frame.len()) {
            self.failed = Some(format!("block {} is not one zstd frame", self.next));
            return;
        }
        let Some(decoder) = self.decoder.as_mut() else {
            return;
        };
        self.out.resize(block, 0);
        // The last block may be short: how short is only known by decoding it, into a
        // buffer of a whole block at most.
        let result = match decoder.decompress_to_buffer(&self.frame[..], &mut self.out[..]) {
            Ok(n) if n == block || (last && n > 0) => Ok(n),
            Ok(n) => Err(format!(
                "block {} decodes to {n} of {block} bytes",
                self.next
            )),
            Err(e) => Err(format!("block {}: {e}", self.next)),
        };
        match result {
            Ok(n) => {
                self.decoded_len += n as u64;
                if self.decoded_len > self.limit {
                    self.failed = Some(format!("it decodes past {} bytes", self.limit));
                    return;
                }
                self.decoded.update(&self.out[..n]);
            }
            Err(e) => self.failed = Some(e),
        }
        self.frame.clear();
        self.next += 1;
    }

    /// Why the stream is not a whole chunk in blocks, if it is not.
    pub(crate) fn incomplete(&self) -> Option<String> {
        if let Some(e) = &self.failed {
            return Some(e.clone());
        }
        match &self.table {
            Some(t) if self.next == t.count() => None,
            _ => Some("the blocks are cut short".into()),
        }
    }
}
