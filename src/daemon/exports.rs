//! The glue between the frontends (NBD, FUSE) and the cache: an export per template
//! (read-only) and per sandbox overlay (read-write). Both frontends serve the same
//! [`NodeExport`], so one chunk is fetched once whichever frontend asked.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::image::ReadError;
use lazyblk_cache::overlay::OverlayError;
use lazyblk_fuse::Folder;
use lazyblk_nbd::{Command, Exports, Extent, FileSlices, OpenError};

use crate::daemon::node::Node;
use crate::daemon::replica::{Lease, Replica};
use crate::daemon::sandboxes::Sandbox;
use crate::daemon::templates::TemplateError;
use crate::daemon::users::UserLease;

/// Maps a failed template read to the errno a block client understands, and logs it
/// with its context (the client only sees the errno).
fn read_error(e: ReadError) -> io::Error {
    match e {
        ReadError::OutOfRange { .. } => io::Error::from_raw_os_error(libc::EINVAL),
        other => {
            tracing::error!(error = %other, "read failed");
            io::Error::from_raw_os_error(libc::EIO)
        }
    }
}

/// Maps a failed overlay operation to an errno (ENOSPC past the end or on a full disk).
fn overlay_error(e: OverlayError) -> io::Error {
    let errno = match &e {
        OverlayError::OutOfRange { op, .. } if *op == "read" => libc::EINVAL,
        OverlayError::OutOfRange { .. } => libc::ENOSPC,
        other => other.raw_os_error().unwrap_or(libc::EIO),
    };
    tracing::error!(error = %e, "overlay operation failed");
    io::Error::from_raw_os_error(errno)
}

/// Records a read of `len` bytes at `offset` in the template's boot trace.
fn record_read(replica: &Replica, offset: u64, len: u64) {
    let image = &replica.image;
    if len > 0 && offset < image.size() {
        let chunk_size = image.manifest().chunk_size as u64;
        let last = (offset + len - 1).min(image.size() - 1);
        replica
            .trace
            .record((offset / chunk_size) as usize, (last / chunk_size) as usize);
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// One export opened by one client (an NBD connection or an open FUSE file). Holding
/// it marks the template or sandbox in use. An enum: the kinds are closed.
pub enum NodeExport {
    Template(Lease),
    Overlay {
        sandbox: Arc<Sandbox>,
        _lease: UserLease,
    },
}

impl NodeExport {
    /// Opens `name` (a sandbox on this node, else a template) for `user`.
    pub async fn open(node: &Node, name: &str, user: String) -> Result<NodeExport, TemplateError> {
        if let Some(sandbox) = node.sandboxes.get(name) {
            let lease = sandbox.users.lease(user);
            return Ok(NodeExport::Overlay {
                sandbox,
                _lease: lease,
            });
        }
        let replica = node.templates.replica(name).await?;
        Ok(NodeExport::Template(replica.lease(user)))
    }

    pub fn size(&self) -> u64 {
        match self {
            NodeExport::Template(t) => t.replica().image.size(),
            NodeExport::Overlay { sandbox, .. } => sandbox.overlay.size(),
        }
    }

    pub fn read_only(&self) -> bool {
        matches!(self, NodeExport::Template(_))
    }

    /// Reads bytes; template reads are recorded in the template's boot trace.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            NodeExport::Template(t) => {
                let replica = t.replica();
                record_read(replica, offset, buf.len() as u64);
                replica.image.read_at(offset, buf).await.map_err(read_error)
            }
            NodeExport::Overlay { sandbox, .. } => sandbox
                .overlay
                .read_at(offset, buf)
                .await
                .map_err(overlay_error),
        }
    }

    /// A template read as page-cached chunk file pieces, for the NBD server to splice
    /// (see [`lazyblk_nbd::Export::read_files`]); overlays are read with `read`.
    pub fn read_files(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        let NodeExport::Template(t) = self else {
            return false;
        };
        let replica = t.replica();
        let image = &replica.image;
        let found = image.resident_pieces(offset, u64::from(len), |file, piece| match file {
            Some((file, at)) => out.push(file, at, piece, lazyblk_cache::file_resident),
            None => out.push_zeroes(piece),
        });
        if found {
            record_read(replica, offset, u64::from(len));
        }
        found
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
            NodeExport::Overlay { sandbox, .. } => sandbox
                .overlay
                .write_at(offset, data, fua)
                .await
                .map_err(overlay_error),
        }
    }

    pub async fn flush(&self) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Ok(()),
            NodeExport::Overlay { sandbox, .. } => {
                sandbox.overlay.flush_shared().await.map_err(overlay_error)
            }
        }
    }
}

impl lazyblk_nbd::Export for NodeExport {
    fn size(&self) -> u64 {
        NodeExport::size(self)
    }

    fn read_only(&self) -> bool {
        NodeExport::read_only(self)
    }

    /// Overlays too: every connection shares one overlay, and a flush on any
    /// connection flushes all of it.
    fn can_multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        NodeExport::read(self, offset, buf).await
    }

    fn read_files(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        NodeExport::read_files(self, offset, len, out)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        NodeExport::write(self, offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        NodeExport::flush(self).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
            NodeExport::Overlay { sandbox, .. } => sandbox
                .overlay
                .trim(offset, len, fua)
                .await
                .map_err(overlay_error),
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        match self {
            NodeExport::Template(_) => Err(read_only()),
            NodeExport::Overlay { sandbox, .. } => sandbox
                .overlay
                .write_zeroes(offset, len, fua)
                .await
                .map_err(overlay_error),
        }
    }

    async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            NodeExport::Template(t) => t.replica().image.prefetch_range(offset, len),
            NodeExport::Overlay { sandbox, .. } => sandbox.overlay.prefetch(offset, len),
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let extents = match self {
            NodeExport::Template(t) => t.replica().image.extents(offset, len),
            NodeExport::Overlay { sandbox, .. } => sandbox.overlay.extents(offset, len),
        };
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                hole: e.zero,
                zero: e.zero,
            })
            .collect())
    }
}

/// A FUSE file: an export, and the metrics its reads and writes are counted in (as
/// `fuse_read` and `fuse_write` beside the NBD commands).
pub struct FuseFile {
    export: NodeExport,
    metrics: Arc<crate::daemon::counters::DaemonMetrics>,
}

impl lazyblk_fuse::File for FuseFile {
    fn size(&self) -> u64 {
        self.export.size()
    }

    fn writable(&self) -> bool {
        !self.export.read_only()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let started = std::time::Instant::now();
        let result = self.export.read(offset, buf).await;
        let ok = result.is_ok();
        self.metrics
            .nbd_request("fuse_read", buf.len() as u64, started.elapsed(), ok);
        result
    }

    async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let started = std::time::Instant::now();
        let result = self.export.write(offset, data, false).await;
        let ok = result.is_ok();
        self.metrics
            .nbd_request("fuse_write", data.len() as u64, started.elapsed(), ok);
        result
    }

    async fn flush(&self) -> io::Result<()> {
        self.export.flush().await
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
        match NodeExport::open(&self.node, name, format!("nbd client {peer}")).await {
            Ok(export) => Ok(Arc::new(export)),
            Err(TemplateError::UnknownTemplate(..)) => Err(OpenError::Unknown),
            Err(e) => {
                tracing::warn!(export = name, %peer, error = %e, "export unavailable");
                Err(OpenError::Unavailable(e.to_string()))
            }
        }
    }

    async fn list(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = self
            .node
            .sandboxes
            .all()
            .iter()
            .map(|s| {
                let description =
                    format!("sandbox overlay over {} (read-write)", s.template().id());
                (s.id().to_string(), description)
            })
            .collect();
        all.extend(
            self.node
                .templates
                .names()
                .await
                .into_iter()
                .map(|n| (n, "template (read-only)".to_string())),
        );
        all
    }

    fn observe(&self, command: Command, bytes: u64, elapsed: Duration, ok: bool) {
        self.node
            .metrics
            .nbd_request(command.name(), bytes, elapsed, ok);
    }

    fn spliced(&self, bytes: u64) {
        self.node.metrics.spliced(bytes);
    }
}

/// The node's templates and sandboxes, as the FUSE mount sees them. Answers from local
/// state only: templates appear once this node knows them (the daemon learns the
/// store's templates in the background), whether their replica is in memory or only
/// their manifest on disk.
pub struct FuseFiles {
    pub node: Arc<Node>,
}

impl lazyblk_fuse::Files for FuseFiles {
    type File = FuseFile;

    fn list(&self, folder: Folder) -> Vec<String> {
        match folder {
            // A template this node refuses (--trusted-keys) has no file.
            Folder::Templates => self.node.templates.servable_ids(),
            Folder::Sandboxes => self
                .node
                .sandboxes
                .all()
                .iter()
                .map(|s| s.id().to_string())
                .collect(),
        }
    }

    fn open(&self, folder: Folder, name: &str) -> Option<Arc<FuseFile>> {
        let export = match folder {
            Folder::Templates => {
                let replica = self.node.templates.known(name)?;
                if let Err(e) = self.node.templates.trusted(name) {
                    tracing::warn!(template = name, error = %e, "FUSE file refused");
                    return None;
                }
                NodeExport::Template(replica.lease(format!("fuse file templates/{name}")))
            }
            Folder::Sandboxes => {
                let sandbox = self.node.sandboxes.get(name)?;
                let lease = sandbox.users.lease(format!("fuse file sandboxes/{name}"));
                NodeExport::Overlay {
                    sandbox,
                    _lease: lease,
                }
            }
        };
        Some(Arc::new(FuseFile {
            export,
            metrics: self.node.metrics.clone(),
        }))
    }
}
