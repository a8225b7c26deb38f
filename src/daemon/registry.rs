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
}
