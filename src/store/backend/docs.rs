//! Small documents the store keeps for its control plane (the template center's desired
//! state): `center/<name>` beside manifests and chunks, written whole (a temporary file
//! and a rename in a directory; one PUT in object storage).

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutPayload};

use super::dir::{read_optional, write_atomic_in, DirBackend};
use super::object::{object_err, ObjectBackend};
use super::{Backend, BackendError};

/// The folder (or key prefix) of the documents.
const DOCS: &str = "center";

impl Backend {
    /// The document `name`, if stored.
    pub async fn doc(&self, name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        match self {
            Backend::Dir(d) => d.doc(name).await,
            Backend::Object(o) => o.doc(name).await,
        }
    }

    /// Stores (or replaces) the document `name`.
    pub async fn put_doc(&self, name: &str, bytes: Vec<u8>) -> Result<(), BackendError> {
        match self {
            Backend::Dir(d) => d.put_doc(name, bytes).await,
            Backend::Object(o) => o.put_doc(name, bytes).await,
        }
    }
}

impl DirBackend {
    async fn doc(&self, name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        read_optional(self.root.join(DOCS).join(name)).await
    }

    async fn put_doc(&self, name: &str, bytes: Vec<u8>) -> Result<(), BackendError> {
        let dir = self.root.join(DOCS);
        let name = name.to_string();
        super::dir::blocking(move || write_atomic_in(&dir, &name, &bytes)).await
    }
}

impl ObjectBackend {
    fn doc_key(&self, name: &str) -> ObjectPath {
        self.prefix.clone().join(DOCS).join(name)
    }

    async fn doc(&self, name: &str) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self
            .get_optional(&self.doc_key(name))
            .await?
            .map(|b| b.to_vec()))
    }

    async fn put_doc(&self, name: &str, bytes: Vec<u8>) -> Result<(), BackendError> {
        let key = self.doc_key(name);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(object_err("writing", &key))?;
        Ok(())
    }
}
