//! Overlay tests against a reference model: a `Vec<u8>` of what the device must read.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::chunk_store::ChunkStore;
use crate::digest::Digest;
use crate::fetch::{ChunkCache, NoObserver, DEFAULT_SOURCE_DEADLINE};
use crate::manifest::Manifest;

const CHUNK: u32 = 64 << 10;
const SIZE: u64 = 1 << 20;
const BS: usize = BLOCK_SIZE as usize;

/// A seeded xorshift generator: reproducible "random" operations without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A template whose chunks (except `zero_chunks`) hold pseudo-random bytes, inserted
/// straight into a fresh cache with no sources; and its bytes.
fn template(
    dir: &Path,
    id: &str,
    size: u64,
    zero_chunks: &[usize],
) -> (Arc<TemplateImage>, Vec<u8>) {
    let store = ChunkStore::open(&dir.join(format!("cache-{id}")), 0).unwrap();
    let mut manifest = Manifest::new(id, size, CHUNK);
    let mut bytes = vec![0u8; size as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ size);
    for index in 0..manifest.chunk_count() {
        if zero_chunks.contains(&index) {
            continue;
        }
        let start = index * CHUNK as usize;
        let len = manifest.chunk_len(index) as usize;
        let chunk = rng.bytes(len);
        let digest = Digest::of(&chunk);
        store.insert(&digest, &chunk).unwrap();
        manifest.chunks[index] = Some(digest);
        bytes[start..start + len].copy_from_slice(&chunk);
    }
    let cache = ChunkCache::new(store, Arc::new(NoObserver), DEFAULT_SOURCE_DEADLINE);
    let image = TemplateImage::new(Arc::new(manifest), Arc::new(cache), vec![]);
    (Arc::new(image), bytes)
}

struct Fixture {
    dir: tempfile::TempDir,
    image: Arc<TemplateImage>,
    base: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (image, base) = template(dir.path(), "base", SIZE, &[2, 5]);
        Fixture { dir, image, base }
    }

    fn overlay_dir(&self, sandbox: &str) -> PathBuf {
        self.dir.path().join("overlays").join(sandbox)
    }

    async fn create(&self, sandbox: &str) -> Overlay {
        Overlay::create(self.overlay_dir(sandbox), sandbox, self.image.clone())
            .await
            .unwrap()
    }

    async fn reopen(&self, sandbox: &str) -> Overlay {
        Overlay::open(self.overlay_dir(sandbox), self.image.clone())
            .await
            .unwrap()
    }

    /// The template's bytes, read afresh: they must never change.
    async fn assert_base_unchanged(&self) {
        let mut now = vec![0u8; SIZE as usize];
        self.image.read_at(0, &mut now).await.unwrap();
        assert!(now == self.base, "the template's bytes changed");
    }
}

async fn read_all(overlay: &Overlay) -> Vec<u8> {
    let mut buf = vec![0u8; overlay.size() as usize];
    overlay.read_at(0, &mut buf).await.unwrap();
    buf
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: first difference at byte {i} (block {}): got {}, want {}",
            i / BS,
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: lengths");
}

#[tokio::test]
async fn untouched_overlay_reads_as_the_template() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    assert_same(&read_all(&overlay).await, &f.base, "whole device");
    let mut buf = vec![0u8; 70_001];
    overlay.read_at(CHUNK as u64 - 3, &mut buf).await.unwrap();
    assert_same(&buf, &f.base[CHUNK as usize - 3..][..70_001], "unaligned");
    assert_eq!(overlay.stats().blocks_data, 0);
}

#[tokio::test]
async fn writes_merge_with_the_template() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    let mut model = f.base.clone();
    let mut rng = Rng(7);
    let chunk = CHUNK as u64;
    // Aligned block; unaligned across a block edge; across a chunk edge; inside one
    // block; into a zero chunk; a large unaligned span; the very last bytes.
    for (offset, len) in [
        (8192, 4096),
        (4096 * 3 + 100, 5000),
        (chunk - 10, 30),
        (4096 * 20 + 7, 9),
        (2 * chunk + 512, 4096),
        (3 * chunk + 1, 200_000),
        (SIZE - 3, 3),
    ] {
        let data = rng.bytes(len);
        overlay.write_at(offset, &data, false).await.unwrap();
        model[offset as usize..][..len].copy_from_slice(&data);
        let mut back = vec![0u8; len];
        overlay.read_at(offset, &mut back).await.unwrap();
        assert_same(&back, &data, "read back");
    }
    assert_same(&read_all(&overlay).await, &model, "merged device");
    f.assert_base_unchanged().await;
}

#[tokio::test]
async fn random_operations_match_the_model() {
    let f = Fixture::new();
    let mut overlay = f.create("sb").await;
    let mut model = f.base.clone();
    let mut rng = Rng(0x5eed);
    for step in 0..600 {
        let aligned = rng.below(3) == 0;
        let mut offset = rng.below(SIZE);
        let mut len = 1 + rng.below(100_000);
        if aligned {
            offset = offset / BLOCK_SIZE * BLOCK_SIZE;
            len = len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        }
        let len = len.min(SIZE - offset);
        let range = offset as usize..(offset + len) as usize;
        match rng.below(20) {
            0..=8 => {
                let data = rng.bytes(len as usize);
                overlay
                    .write_at(offset, &data, rng.below(10) == 0)
                    .await
                    .unwrap();
                model[range].copy_from_slice(&data);
            }
            9..=10 => {
                overlay.trim(offset, len, false).await.unwrap();
                model[range].fill(0);
            }
            11..=12 => {
                overlay.write_zeroes(offset, len, false).await.unwrap();
                model[range].fill(0);
            }
            13..=17 => {
                let mut buf = vec![0u8; len as usize];
                overlay.read_at(offset, &mut buf).await.unwrap();
                assert_same(&buf, &model[range], &format!("step {step}: read"));
            }
            18 => overlay.flush().await.unwrap(),
            _ => {
                overlay.flush().await.unwrap();
                drop(overlay);
                overlay = f.reopen("sb").await;
            }
        }
    }
    assert_same(&read_all(&overlay).await, &model, "final device");
    let stats = overlay.stats();
    assert!(stats.blocks_data + stats.blocks_zero <= SIZE / BLOCK_SIZE);
    assert!(stats.blocks_data > 0 && stats.blocks_zero > 0, "{stats:?}");
    f.assert_base_unchanged().await;
}

#[tokio::test]
async fn flushed_writes_survive_a_reopen() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    let mut model = f.base.clone();
    let data = Rng(3).bytes(10_000);
    overlay.write_at(5000, &data, false).await.unwrap();
    model[5000..15_000].copy_from_slice(&data);
    overlay.trim(8 * 4096, 4 * 4096, false).await.unwrap();
    model[8 * 4096..12 * 4096].fill(0);
    overlay.write_at(40_000, &data, true).await.unwrap();
    model[40_000..50_000].copy_from_slice(&data);
    overlay.flush().await.unwrap();
    let stats = overlay.stats();
    drop(overlay);
    let overlay = f.reopen("sb").await;
    assert_same(&read_all(&overlay).await, &model, "after reopen");
    let reopened = overlay.stats();
    assert_eq!(
        (reopened.blocks_data, reopened.blocks_zero),
        (stats.blocks_data, stats.blocks_zero)
    );
    assert_eq!(overlay.meta().template, "base");
    assert_eq!(&**overlay.sandbox(), "sb");
}

#[tokio::test]
async fn a_fua_write_alone_is_durable() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    overlay.write_at(4096, &[9u8; 4096], true).await.unwrap();
    drop(overlay);
    let overlay = f.reopen("sb").await;
    let mut buf = [0u8; 4096];
    overlay.read_at(4096, &mut buf).await.unwrap();
    assert_eq!(buf, [9u8; 4096]);
}

#[tokio::test]
async fn unflushed_writes_read_old_or_new_after_a_crash() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    let mut rng = Rng(11);
    // A flushed state...
    for _ in 0..20 {
        let offset = rng.below(SIZE - 9000);
        overlay
            .write_at(offset, &rng.bytes(9000), false)
            .await
            .unwrap();
    }
    overlay.trim(0, 3 * 4096, false).await.unwrap();
    overlay.flush().await.unwrap();
    let old = read_all(&overlay).await;
    // ...then writes, overwrites, trims and zeroings nobody flushed.
    for i in 0..40 {
        let offset = rng.below(SIZE - 9000);
        match i % 4 {
            0 => overlay.trim(offset, 9000, false).await.unwrap(),
            1 => overlay.write_zeroes(offset, 9000, false).await.unwrap(),
            _ => overlay
                .write_at(offset, &rng.bytes(9000), false)
                .await
                .unwrap(),
        }
    }
    let new = read_all(&overlay).await;
    // The process dies: the in-memory map is gone, the files stay as they are.
    drop(overlay);
    let overlay = f.reopen("sb").await;
    let after = read_all(&overlay).await;
    let mut changed = 0;
    for block in 0..(SIZE as usize / BS) {
        let range = block * BS..(block + 1) * BS;
        let got = &after[range.clone()];
        assert!(
            got == &old[range.clone()] || got == &new[range.clone()],
            "block {block} reads neither its flushed nor its latest bytes"
        );
        changed += usize::from(old[range.clone()] != new[range]);
    }
    assert!(changed > 0, "the test changed nothing");
}

#[tokio::test]
async fn two_overlays_over_one_template_are_isolated() {
    let f = Fixture::new();
    let a = f.create("sb-a").await;
    let b = f.create("sb-b").await;
    a.write_at(100, &[1u8; 5000], false).await.unwrap();
    b.write_at(3000, &[2u8; 5000], false).await.unwrap();
    let mut want_a = f.base.clone();
    want_a[100..5100].fill(1);
    let mut want_b = f.base.clone();
    want_b[3000..8000].fill(2);
    assert_same(&read_all(&a).await, &want_a, "overlay a");
    assert_same(&read_all(&b).await, &want_b, "overlay b");
    f.assert_base_unchanged().await;
}

#[tokio::test]
async fn dirty_chunks_and_their_materialized_bytes() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    assert!(overlay.dirty_chunks().is_empty());
    let chunk = CHUNK as u64;
    let mut model = f.base.clone();
    overlay
        .write_at(3 * chunk + 4000, &[7u8; 300], false)
        .await
        .unwrap();
    model[(3 * chunk + 4000) as usize..][..300].fill(7);
    overlay.trim(7 * chunk, 4096, false).await.unwrap();
    model[(7 * chunk) as usize..][..4096].fill(0);
    // Zeroing inside a zero chunk still dirties it (a commit can keep it null).
    overlay
        .write_zeroes(5 * chunk + 4096, 4096, false)
        .await
        .unwrap();
    assert_eq!(overlay.dirty_chunks(), vec![3, 5, 7]);
    for index in [0, 3, 5, 7, 15] {
        let bytes = overlay.materialize_chunk(index).await.unwrap();
        let start = index * CHUNK as usize;
        assert_same(
            &bytes,
            &model[start..start + CHUNK as usize],
            &format!("chunk {index}"),
        );
    }
    let err = overlay.materialize_chunk(16).await.unwrap_err();
    assert!(
        matches!(err, OverlayError::NoSuchChunk { index: 16, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_holds_writes_back_until_released() {
    let f = Fixture::new();
    let overlay = Arc::new(f.create("sb").await);
    let guard = overlay.freeze().await;
    let writer = {
        let overlay = overlay.clone();
        tokio::spawn(async move { overlay.write_at(0, &[5u8; 4096], false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "a write went through a freeze");
    let mut buf = [0u8; 4096];
    overlay.read_at(0, &mut buf).await.unwrap();
    assert_same(&buf, &f.base[..4096], "read while frozen");
    overlay.flush().await.unwrap();
    drop(guard);
    writer.await.unwrap().unwrap();
    overlay.read_at(0, &mut buf).await.unwrap();
    assert_eq!(buf, [5u8; 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_writes_to_one_block_keep_every_byte() {
    let f = Fixture::new();
    let overlay = Arc::new(f.create("sb").await);
    // Writers of disjoint pieces of one block, each rewriting its piece many times and
    // checking it is still there: a read-modify-write that raced another would put the
    // other's piece back to what it was.
    const PIECES: usize = 8;
    const ROUNDS: usize = 300;
    let piece = BS / PIECES;
    let mut tasks = Vec::new();
    for i in 0..PIECES {
        let overlay = overlay.clone();
        tasks.push(tokio::spawn(async move {
            let offset = BLOCK_SIZE + (i * piece) as u64;
            let mut back = vec![0u8; piece];
            let mut lost = 0;
            for round in 0..ROUNDS {
                let value = (round % 250) as u8 + 1;
                overlay
                    .write_at(offset, &vec![value; piece], false)
                    .await
                    .unwrap();
                overlay.read_at(offset, &mut back).await.unwrap();
                lost += usize::from(back.iter().any(|&b| b != value));
                tokio::task::yield_now().await;
            }
            lost
        }));
    }
    let mut lost = 0;
    for task in tasks {
        lost += task.await.unwrap();
    }
    let mut block = vec![0u8; BS];
    overlay.read_at(BLOCK_SIZE, &mut block).await.unwrap();
    let last = ((ROUNDS - 1) % 250) as u8 + 1;
    for i in 0..PIECES {
        lost += usize::from(block[i * piece..(i + 1) * piece].iter().any(|&b| b != last));
    }
    assert_eq!(lost, 0, "pieces of a block were lost to concurrent writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_see_a_half_written_block() {
    let f = Fixture::new();
    let overlay = Arc::new(f.create("sb").await);
    const SPAN: usize = 64 * BS;
    overlay.write_at(0, &vec![0u8; SPAN], false).await.unwrap();
    let writer = {
        let overlay = overlay.clone();
        tokio::spawn(async move {
            for value in 1..=250u8 {
                overlay.write_at(0, &vec![value; SPAN], false).await?;
                // A patch across a block edge: each block stays uniform but for the patch.
                overlay
                    .write_at(BS as u64 - 100, &[value; 200], false)
                    .await?;
            }
            Ok::<_, OverlayError>(())
        })
    };
    let mut readers = Vec::new();
    for _ in 0..3 {
        let overlay = overlay.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; SPAN];
            let mut torn = 0;
            for _ in 0..200 {
                overlay.read_at(0, &mut buf).await.unwrap();
                for block in buf.chunks(BS) {
                    // Written whole under its lock: uniform, or a 100-byte patch at one
                    // end over a uniform block; never two values mixed elsewhere.
                    let (first, last) = (block[0], block[BS - 1]);
                    let mixed = block[100..BS - 100].iter().any(|&b| b != block[100])
                        || (block[..100].iter().any(|&b| b != first))
                        || (block[BS - 100..].iter().any(|&b| b != last));
                    torn += usize::from(mixed);
                }
                tokio::task::yield_now().await;
            }
            torn
        }));
    }
    writer.await.unwrap().unwrap();
    let mut torn = 0;
    for reader in readers {
        torn += reader.await.unwrap();
    }
    assert_eq!(torn, 0, "blocks were read half written");
}

#[tokio::test]
async fn extents_report_zero_blocks_and_zero_template_chunks() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    let chunk = CHUNK as u64;
    let data = |length| ImageExtent {
        length,
        zero: false,
    };
    let zero = |length| ImageExtent { length, zero: true };
    // Template: chunks 2 and 5 are zero chunks.
    assert_eq!(
        overlay.extents(0, SIZE),
        vec![
            data(2 * chunk),
            zero(chunk),
            data(2 * chunk),
            zero(chunk),
            data(10 * chunk)
        ]
    );
    overlay.write_zeroes(4096, 2 * 4096, false).await.unwrap();
    overlay
        .write_at(2 * chunk + 4096, &[1u8; 4096], false)
        .await
        .unwrap();
    assert_eq!(
        overlay.extents(0, 3 * chunk),
        vec![
            data(4096),
            zero(2 * 4096),
            data(2 * chunk - 3 * 4096),
            zero(4096),
            data(4096),
            zero(chunk - 2 * 4096),
        ]
    );
    // Clipped to the request and to the device.
    assert_eq!(overlay.extents(4096 + 10, 100), vec![zero(100)]);
    assert_eq!(overlay.extents(SIZE - 10, 1000), vec![data(10)]);
}

#[tokio::test]
async fn requests_past_the_end_are_refused() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    let mut buf = [0u8; 10];
    let err = overlay.read_at(SIZE - 5, &mut buf).await.unwrap_err();
    assert!(matches!(err, OverlayError::OutOfRange { .. }), "{err}");
    assert!(err.to_string().contains("sb"), "{err}");
    let err = overlay
        .write_at(u64::MAX - 2, &buf, false)
        .await
        .unwrap_err();
    assert!(matches!(err, OverlayError::OutOfRange { .. }), "{err}");
    assert!(overlay.trim(SIZE, 1, false).await.is_err());
    overlay.write_at(SIZE, &[], false).await.unwrap();
    overlay.read_at(SIZE, &mut []).await.unwrap();
}

#[tokio::test]
async fn open_checks_the_template_and_the_files() {
    let f = Fixture::new();
    drop(f.create("sb").await);
    let (other, _) = template(f.dir.path(), "other", SIZE, &[]);
    let err = Overlay::open(f.overlay_dir("sb"), other)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::MetaMismatch { .. }), "{err}");
    assert!(err.to_string().contains("other"), "{err}");
    let (bigger, _) = template(f.dir.path(), "base", 2 * SIZE, &[]);
    let err = Overlay::open(f.overlay_dir("sb"), bigger)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::MetaMismatch { .. }), "{err}");
    let err = Overlay::create(f.overlay_dir("sb"), "sb", f.image.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::Exists { .. }), "{err}");
    let err = Overlay::create(f.overlay_dir("x"), "Bad/Id", f.image.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::InvalidSandbox(_)), "{err}");
    // A map byte that is no state is refused, naming the file.
    std::fs::write(f.overlay_dir("sb").join(disk::MAP_FILE), {
        let mut map = vec![0u8; (SIZE / BLOCK_SIZE) as usize];
        map[9] = 7;
        map
    })
    .unwrap();
    let err = Overlay::open(f.overlay_dir("sb"), f.image.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("map"), "{err}");
}

#[tokio::test]
async fn delete_removes_the_overlay() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    overlay.write_at(0, &[1u8; 8192], true).await.unwrap();
    overlay.delete().await.unwrap();
    assert!(!f.overlay_dir("sb").exists());
    assert!(Overlay::open(f.overlay_dir("sb"), f.image.clone())
        .await
        .is_err());
    // Deleting what is gone is not an error; the name can be used again.
    Overlay::remove_dir(f.overlay_dir("sb")).await.unwrap();
    let again = f.create("sb").await;
    assert_same(&read_all(&again).await, &f.base, "recreated overlay");
}

#[tokio::test]
async fn stats_count_blocks_and_trim_frees_space() {
    let f = Fixture::new();
    let overlay = f.create("sb").await;
    overlay
        .write_at(0, &vec![3u8; 64 * BS], false)
        .await
        .unwrap();
    overlay
        .write_zeroes(64 * BLOCK_SIZE, 2 * BLOCK_SIZE, false)
        .await
        .unwrap();
    overlay.flush().await.unwrap();
    let written = overlay.stats();
    assert_eq!((written.blocks_data, written.blocks_zero), (64, 2));
    assert!(written.bytes_on_disk >= 64 * BLOCK_SIZE, "{written:?}");
    overlay.trim(0, 32 * BLOCK_SIZE, false).await.unwrap();
    let trimmed = overlay.stats();
    assert_eq!((trimmed.blocks_data, trimmed.blocks_zero), (32, 34));
    assert!(
        trimmed.bytes_on_disk < written.bytes_on_disk,
        "{trimmed:?} vs {written:?}"
    );
}
