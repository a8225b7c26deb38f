//! A map from id to shared object, read often and changed rarely: the node's replicas
//! and its sandboxes.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Objects by id, listed in id order.
pub struct Registry<T>(RwLock<BTreeMap<String, Arc<T>>>);

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry(RwLock::new(BTreeMap::new()))
    }
}

impl<T> Registry<T> {
    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every object, in id order.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Adds `value` under `id` unless the id is taken; returns the object registered.
    pub fn insert_new(&self, id: String, value: Arc<T>) -> Arc<T> {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id)
            .or_insert(value)
            .clone()
    }

    pub fn remove(&self, id: &str) -> Option<Arc<T>> {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id)
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drops objects that `idle` accepts and that nobody else holds (the registry's is
    /// the only reference, checked under its lock, so no caller can be using one), until
    /// at most `keep` are left. Returns how many were dropped.
    pub fn drop_idle(&self, keep: usize, idle: impl Fn(&T) -> bool) -> usize {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        let excess = map.len().saturating_sub(keep);
        let unused: Vec<String> = map
            .iter()
            .filter(|(_, v)| Arc::strong_count(v) == 1 && idle(v))
            .map(|(k, _)| k.clone())
            .take(excess)
            .collect();
        for id in &unused {
            map.remove(id);
        }
        unused.len()
    }
}
