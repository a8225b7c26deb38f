//! The glue between the frontends (NBD, FUSE) and the cache: an export per template
//! (read-only) and, later, per sandbox overlay (read-write).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::image::ReadError;
use lazyblk_nbd::{Command, Exports, Extent, OpenError};

use crate::daemon::node::{Lease, Node, NodeError};

/// A template opened by one client. Holding it marks the template in use.
pub struct TemplateExport {
    lease: Lease,
}

impl TemplateExport {
    pub fn new(lease: Lease) -> TemplateExport {
        TemplateExport { lease }
    }

    pub fn size(&self) -> u64 {
        self.lease.replica().image.size()
    }

    /// Reads template bytes, recording first reads in the template's trace.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let replica = self.lease.replica();
        let image = &replica.image;
        if !buf.is_empty() && offset < image.size() {
            let chunk_size = image.manifest().chunk_size as u64;
            let last = (offset + buf.len() as u64 - 1).min(image.size() - 1);
            replica
                .trace
                .record((offset / chunk_size) as usize, (last / chunk_size) as usize);
        }
        image.read_at(offset, buf).await.map_err(read_error)
    }

    pub fn prefetch(&self, offset: u64, len: u64) {
        self.lease.replica().image.prefetch_range(offset, len);
    }

    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.lease
            .replica()
            .image
            .extents(offset, len)
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                hole: e.zero,
                zero: e.zero,
            })
            .collect()
    }
}

/// Maps a failed template read to the errno a block client understands, and logs it
/// with its context (the client only sees EIO).
fn read_error(e: ReadError) -> io::Error {
    match e {
        ReadError::OutOfRange { .. } => io::Error::from_raw_os_error(libc::EINVAL),
        other => {
            tracing::error!(error = %other, "read failed");
            io::Error::from_raw_os_error(libc::EIO)
        }
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// One export as a frontend sees it. An enum: the kinds are closed.
pub enum NodeExport {
    Template(TemplateExport),
}

impl lazyblk_nbd::Export for NodeExport {
    fn size(&self) -> u64 {
        match self {
            NodeExport::Template(t) => t.size(),
        }
    }

    fn read_only(&self) -> bool {
        match self {
            NodeExport::Template(_) => true,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            NodeExport::Template(t) => t.read(offset, buf).await,
        }
    }

    async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
        }
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
        }
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            NodeExport::Template(t) => t.prefetch(offset, len),
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        match self {
            NodeExport::Template(t) => Ok(t.extents(offset, len)),
        }
    }
}

/// The node's exports, as the NBD server sees them.
pub struct NbdExports {
    pub node: Arc<Node>,
}

impl Exports for NbdExports {
    type Export = NodeExport;

    async fn open(&self, name: &str, peer: &str) -> Result<Arc<NodeExport>, OpenError> {
        if lazyblk_cache::validate_id(name).is_err() {
            return Err(OpenError::Unknown);
        }
        match self.node.replica(name).await {
            Ok(replica) => {
                let lease = replica.lease(format!("nbd client {peer}"));
                Ok(Arc::new(NodeExport::Template(TemplateExport::new(lease))))
            }
            Err(NodeError::UnknownTemplate(..)) => Err(OpenError::Unknown),
            Err(e) => {
                tracing::warn!(export = name, %peer, error = %e, "export unavailable");
                Err(OpenError::Unavailable(e.to_string()))
            }
        }
    }

    async fn list(&self) -> Vec<(String, String)> {
        self.node
            .template_names()
            .await
            .into_iter()
            .map(|n| (n, "template (read-only)".to_string()))
            .collect()
    }

    fn observe(&self, command: Command, bytes: u64, elapsed: Duration, ok: bool) {
        self.node
            .metrics
            .nbd_request(command.name(), bytes, elapsed, ok);
    }
}
