//! Named pins: which owners need which chunks kept. An owner is a name the daemon
//! chooses for one claim (`replica:py311` for a READY replica, `upload:py311-c1` for a
//! commit's chunks until the store has them). Each owner holds a digest at most once,
//! so pinning a template with repeated chunks, or pinning twice, takes one claim;
//! releasing an owner drops exactly its claims. A claim does not need the chunk to be
//! present: a chunk dropped as corrupt and fetched again is still claimed, and a claim
//! taken before a write keeps the write from being evicted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::digest::Digest;

#[derive(Default)]
pub(crate) struct Pins {
    by_owner: HashMap<Arc<str>, HashSet<Digest>>,
    /// Owners holding each digest.
    holders: HashMap<Digest, u32>,
}

impl Pins {
    /// Claims `digest` for `owner`; false if the owner already held it.
    pub(crate) fn pin(&mut self, owner: &str, digest: Digest) -> bool {
        let held = match self.by_owner.get_mut(owner) {
            Some(set) => set,
            None => self.by_owner.entry(Arc::from(owner)).or_default(),
        };
        if !held.insert(digest) {
            return false;
        }
        *self.holders.entry(digest).or_default() += 1;
        true
    }

    /// Drops `owner`'s claim on `digest`; false if it had none.
    pub(crate) fn unpin(&mut self, owner: &str, digest: &Digest) -> bool {
        let Some(held) = self.by_owner.get_mut(owner) else {
            return false;
        };
        if !held.remove(digest) {
            return false;
        }
        if held.is_empty() {
            self.by_owner.remove(owner);
        }
        self.drop_holder(digest);
        true
    }

    /// Drops every claim of `owner`; returns how many there were.
    pub(crate) fn release(&mut self, owner: &str) -> usize {
        let Some(held) = self.by_owner.remove(owner) else {
            return 0;
        };
        for digest in &held {
            self.drop_holder(digest);
        }
        held.len()
    }

    fn drop_holder(&mut self, digest: &Digest) {
        if let Some(n) = self.holders.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(digest);
            }
        }
    }

    pub(crate) fn is_pinned(&self, digest: &Digest) -> bool {
        self.holders.contains_key(digest)
    }

    /// Digests `owner` holds.
    pub(crate) fn held_by(&self, owner: &str) -> usize {
        self.by_owner.get(owner).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::from_bytes([n; 32])
    }

    #[test]
    fn each_owner_holds_a_digest_once_and_releases_exactly_its_own() {
        let mut pins = Pins::default();
        assert!(pins.pin("replica:a", d(1)));
        assert!(
            !pins.pin("replica:a", d(1)),
            "a second pin by the same owner is one claim"
        );
        assert!(pins.pin("upload:b", d(1)));
        assert!(pins.pin("upload:b", d(2)));
        assert_eq!(pins.held_by("upload:b"), 2);
        assert!(pins.unpin("replica:a", &d(1)));
        assert!(!pins.unpin("replica:a", &d(1)), "nothing left to drop");
        assert!(pins.is_pinned(&d(1)), "still held by upload:b");
        assert_eq!(pins.release("upload:b"), 2);
        assert!(!pins.is_pinned(&d(1)) && !pins.is_pinned(&d(2)));
        assert_eq!(pins.release("nobody"), 0);
    }
}
