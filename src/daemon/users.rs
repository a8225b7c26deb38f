//! Who is using a template or an overlay: NBD connections, open FUSE files, overlays
//! over a template. Named in the error that refuses an eviction or deletion.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The current users of one template or overlay.
#[derive(Default)]
pub struct Users(Mutex<BTreeMap<u64, String>>);

impl Users {
    /// Registers `user` until the returned lease is dropped.
    pub fn lease(self: &Arc<Self>, user: String) -> UserLease {
        static NEXT_LEASE: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_LEASE.fetch_add(1, Ordering::Relaxed);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, user);
        UserLease {
            users: self.clone(),
            id,
        }
    }

    /// The users, in the order they came.
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// One use; dropping it ends the use.
pub struct UserLease {
    users: Arc<Users>,
    id: u64,
}

impl Drop for UserLease {
    fn drop(&mut self) {
        self.users
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_come_and_go() {
        let users = Arc::new(Users::default());
        let a = users.lease("nbd client 1".into());
        let b = users.lease("fuse open".into());
        assert_eq!(users.names(), vec!["nbd client 1", "fuse open"]);
        drop(a);
        assert_eq!(users.names(), vec!["fuse open"]);
        drop(b);
        assert!(users.names().is_empty());
    }
}
