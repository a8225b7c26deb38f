//! Unit tests of the chunk store: crash-safe writes, the budget, claims, verification.

use super::*;
use std::sync::Arc;

fn chunk(n: u8) -> (Digest, Vec<u8>) {
    let bytes = vec![n; 1000];
    (Digest::of(&bytes), bytes)
}

#[test]
fn insert_get_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (d, bytes) = chunk(1);
    {
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        assert!(store.get(&d).unwrap().is_none());
        store.insert(&d, &bytes).unwrap();
        let f = store.get(&d).unwrap().unwrap();
        assert_eq!(f.read_all().unwrap(), bytes);
    }
    fs::write(dir.path().join("tmp/leftover"), b"half").unwrap();
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    assert_eq!(store.chunk_count(), 1);
    assert_eq!(store.used_bytes(), 1000);
    assert!(fs::read_dir(dir.path().join("tmp"))
        .unwrap()
        .next()
        .is_none());
    let mut buf = [0u8; 10];
    store
        .get(&d)
        .unwrap()
        .unwrap()
        .read_at(990, &mut buf)
        .unwrap();
    assert_eq!(buf, [1u8; 10]);
}

#[test]
fn evicts_lru_but_not_pinned_or_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 2500).unwrap();
    let (a, ab) = chunk(1);
    let (b, bb) = chunk(2);
    let (c, cb) = chunk(3);
    let (e, eb) = chunk(4);
    store.insert(&a, &ab).unwrap();
    assert_eq!(store.pin("t", [a]), 0);
    let reading_b = store.insert(&b, &bb).unwrap();
    // Over budget by 500, but a is pinned, b is being read and c was just written
    // for a reader: nothing can go yet.
    drop(store.insert(&c, &cb).unwrap());
    assert_eq!(store.used_bytes(), 3000);
    drop(reading_b);
    store.insert(&e, &eb).unwrap();
    // Now b and c (least recently used, idle) go; a stays pinned.
    assert!(store.contains(&a) && !store.contains(&b) && !store.contains(&c));
    assert!(store.contains(&e));
    assert!(store.used_bytes() <= 2500);
    assert_eq!(store.evictions(), 2);
    store.unpin("t", &a);
    assert!(store.remove(&a));
}

#[test]
fn a_corrupt_file_is_dropped_at_first_open_and_its_pins_survive_the_refetch() {
    let dir = tempfile::tempdir().unwrap();
    let (d, bytes) = chunk(7);
    {
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        store.insert(&d, &bytes).unwrap();
    }
    let path = dir.path().join("chunks").join(d.shard_path());
    let mut bad = bytes.clone();
    bad[10] ^= 0xff;
    fs::write(&path, &bad).unwrap();
    let store = ChunkStore::open(dir.path(), 1500).unwrap();
    assert_eq!(store.pin("t", [d]), 0, "indexed at open, before any check");
    assert!(
        store.get(&d).unwrap().is_none(),
        "corrupt bytes are never handed out"
    );
    assert_eq!(store.corrupt_files(), 1);
    assert!(!path.exists());
    // Written again (refetched): the pin taken before the drop still holds.
    store.insert(&d, &bytes).unwrap();
    let (e, eb) = chunk(8);
    store.insert(&e, &eb).unwrap();
    assert!(store.contains(&d), "still pinned: not evicted over budget");
    store.unpin("t", &d);
    assert!(
        !store.contains(&d),
        "unpinned, the oldest chunk goes over budget"
    );
}

#[test]
fn scrub_drops_what_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    let (a, ab) = chunk(1);
    let (b, bb) = chunk(2);
    store.insert(&a, &ab).unwrap();
    store.insert(&b, &bb).unwrap();
    fs::write(dir.path().join("chunks").join(b.shard_path()), b"short").unwrap();
    let report = store.scrub(|_, _| {});
    assert_eq!(report.checked, 2);
    assert_eq!(report.dropped, vec![b.to_hex()]);
    assert!(store.contains(&a) && !store.contains(&b));
}

#[test]
fn insert_pinned_pins_in_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 1000).unwrap();
    let (a, ab) = chunk(1);
    let (b, bb) = chunk(2);
    store.insert_pinned("upload:t", &a, &ab).unwrap();
    store.insert_pinned("upload:t", &a, &ab).unwrap();
    store.insert(&b, &bb).unwrap();
    assert!(
        store.contains(&a),
        "a pinned new chunk is never the one evicted"
    );
    assert_eq!(
        store.held_by("upload:t"),
        1,
        "one claim however often pinned"
    );
    assert_eq!(store.release("upload:t"), 1);
    assert!(
        !store.contains(&a),
        "released, the oldest chunk goes over budget"
    );
}

#[test]
fn residency_follows_the_page_cache() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let d = Digest::of(&bytes);
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    store.insert(&d, &bytes).unwrap();
    let f = store.get(&d).unwrap().unwrap();
    // Just written: every page is cached (dirty or clean).
    assert!(f.resident(0, bytes.len() as u64));
    assert!(f.resident(5000, 70_000));
    assert!(f.resident(0, 0));
    // Written back and dropped from the page cache: a read would go to the disk.
    f.file().sync_all().unwrap();
    // SAFETY: advice on an open descriptor; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(f.file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    if !f.resident(0, bytes.len() as u64) {
        // Reading a piece brings only that piece back.
        let mut buf = vec![0u8; 4096];
        f.read_at(0, &mut buf).unwrap();
        assert!(f.resident(0, 4096));
        // (Past any readahead window of the first read.)
        assert!(!f.resident((4 << 20) - 4096, 4096));
    } else {
        // A file system whose pages stay (tmpfs): nothing to drop, still resident.
        assert!(f.resident(128 << 10, 4096));
    }
}

#[test]
fn an_evicted_chunk_fetched_again_keeps_its_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 2500).unwrap();
    let (a, bytes_a) = chunk(1);
    let (b, bytes_b) = chunk(2);
    let (c, bytes_c) = chunk(3);
    store.insert(&a, &bytes_a).unwrap();
    store.insert(&b, &bytes_b).unwrap();
    // Over budget: `a`, the least recently used, is evicted and its file unlinked
    // (outside the index lock), and nothing is left dying.
    store.insert(&c, &bytes_c).unwrap();
    assert!(!store.contains(&a));
    assert!(!store.chunk_path(&a).exists());
    assert!(store.index().dying.is_empty());
    assert_eq!(store.evictions(), 1);
    // Fetched again, it gets a file that stays (the old unlink is done before the
    // new name is taken).
    store.insert(&a, &bytes_a).unwrap();
    assert!(store.chunk_path(&a).exists());
    assert_eq!(store.get(&a).unwrap().unwrap().read_all().unwrap(), bytes_a);
    assert!(store.remove(&a));
    assert!(!store.chunk_path(&a).exists());
    assert!(store.index().dying.is_empty());
}

#[test]
fn a_new_copy_waits_for_the_unlink_of_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::open(dir.path(), 0).unwrap());
    let (a, bytes_a) = chunk(1);
    // As if an eviction of `a` had taken it out of the index and not yet unlinked it.
    store.index().dying.insert(a);
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.insert(&a, &bytes_a).map(|_| ()))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        !store.chunk_path(&a).exists(),
        "the new copy took the name while the old one was being unlinked"
    );
    store.index().dying.remove(&a);
    writer.join().unwrap().unwrap();
    assert!(store.chunk_path(&a).exists());
    assert!(store.contains(&a));
}

#[test]
fn fetched_chunks_are_made_durable_together_and_a_commits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    let (a, ab) = chunk(1);
    let (b, bb) = chunk(2);
    let (c, cb) = chunk(3);
    let (absent, _) = chunk(4);
    store.insert(&a, &ab).unwrap();
    store.insert(&b, &bb).unwrap();
    assert!(
        !store.is_synced(&a) && !store.is_synced(&b),
        "a fetched chunk is not waited for on its own"
    );
    store.insert_pinned("upload:t", &c, &cb).unwrap();
    assert!(store.is_synced(&c), "a commit's chunk is durable at once");
    assert_eq!(
        store.make_durable([a, absent]).unwrap(),
        0,
        "an absent one is no drop"
    );
    assert!(store.is_synced(&a), "named: made durable");
    assert!(!store.is_synced(&b), "not named: left to the kernel");
    // A fetched chunk a commit then writes is made durable by that write.
    store.insert_pinned("upload:t", &b, &bb).unwrap();
    assert!(store.is_synced(&b));
}

#[test]
fn a_chunk_file_a_crash_left_short_is_dropped_not_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ab) = chunk(1);
    let (b, bb) = chunk(2);
    {
        let store = ChunkStore::open(dir.path(), 0).unwrap();
        store.insert(&a, &ab).unwrap();
        store.insert(&b, &bb).unwrap();
    }
    // The name was renamed in, the bytes never all written back: zeroes, or a short file.
    let path = dir.path().join("chunks").join(b.shard_path());
    fs::write(&path, vec![0u8; bb.len()]).unwrap();
    let (c, cb) = chunk(3);
    store_file(dir.path(), &c, &cb[..cb.len() / 2]);
    let store = ChunkStore::open(dir.path(), 0).unwrap();
    assert!(
        !store.is_synced(&a),
        "found on disk: the daemon before may have died before the write-back"
    );
    store.pin("replica:t", [a, b, c]);
    assert_eq!(store.make_durable([a, b, c]).unwrap(), 2, "both dropped");
    assert!(!store.contains(&c));
    assert!(store.is_synced(&a));
    assert!(
        !store.contains(&b) && !path.exists(),
        "not promised as local"
    );
    assert_eq!(store.corrupt_files(), 2);
    // Fetched again while a replica claims it: durable at once, no fill waits for it.
    store.insert(&b, &bb).unwrap();
    assert!(store.is_synced(&b));
    assert_eq!(store.make_durable([a, b]).unwrap(), 0);
    assert_eq!(store.get(&a).unwrap().unwrap().read_all().unwrap(), ab);
}

/// Writes `bytes` under `digest`'s name, as a crash may have left them.
fn store_file(root: &Path, digest: &Digest, bytes: &[u8]) {
    let path = root.join("chunks").join(digest.shard_path());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}
