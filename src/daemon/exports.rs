//! The node's images as every frontend sees them: the one implementation of
//! `lazyblk-image`'s traits over the cache. An image per template (read-only) and per
//! sandbox overlay (read-write); the NBD server, the FUSE mount and the kernel's
//! devices all serve [`NodeImage`]s opened from a [`NodeImages`] set, so one chunk is
//! fetched once whichever door asked. The sets differ only in how they name their
//! users and in write-through (for kernel devices, which outlive the daemon).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use lazyblk_cache::image::ReadError;
use lazyblk_cache::overlay::OverlayError;
use lazyblk_image::{
    Door, Extent, FileSlices, Images, Kind, Listing, Op, OpenError, PrefetchImage, ReadImage,
    SparseImage, WriteImage,
};

use crate::daemon::node::Node;
use crate::daemon::replica::Lease;
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

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

/// What one opener holds: a template's lease or a sandbox with its user's lease.
/// Holding it marks the template or sandbox in use. An enum: the kinds are closed.
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
            node.replays.opened(sandbox.template());
            let lease = sandbox.users.lease(user);
            return Ok(NodeExport::Overlay {
                sandbox,
                _lease: lease,
            });
        }
        let replica = node.template_to_open(name).await?;
        node.replays.opened(&replica);
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

    /// Reads bytes; reads of a template, and a sandbox's reads (of its base template,
    /// mostly, while it boots), are recorded in the template's boot trace.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self {
            NodeExport::Template(t) => {
                let replica = t.replica();
                replica.note_read(offset, buf.len() as u64);
                replica.image.read_at(offset, buf).await.map_err(read_error)
            }
            NodeExport::Overlay { sandbox, .. } => {
                sandbox.template().note_read(offset, buf.len() as u64);
                sandbox
                    .overlay
                    .read_at(offset, buf)
                    .await
                    .map_err(overlay_error)
            }
        }
    }

    /// A template read as page-cached chunk file pieces, for the NBD server to splice
    /// (see [`ReadImage::resident_pieces`]); overlays are read with `read`.
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
            replica.note_read(offset, u64::from(len));
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

impl NodeExport {
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

    fn prefetch(&self, offset: u64, len: u64) {
        match self {
            NodeExport::Template(t) => t.replica().image.prefetch_range(offset, len),
            NodeExport::Overlay { sandbox, .. } => sandbox.overlay.prefetch(offset, len),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let extents = match self {
            NodeExport::Template(t) => t.replica().image.extents(offset, len),
            NodeExport::Overlay { sandbox, .. } => sandbox.overlay.extents(offset, len),
        };
        extents
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                hole: e.zero,
                zero: e.zero,
            })
            .collect()
    }
}

/// One image opened by one user (an NBD connection, an open FUSE file, a kernel
/// device's connection).
///
/// With `write_through`, every write, trim and write-zeroes is made durable before it
/// returns (as if it carried FUA): kernel devices outlive the daemon, an overlay keeps
/// the map of what was written in memory until a flush, and a device that reconnects
/// after a daemon restart would otherwise find writes it was told were done missing;
/// its file system does not re-read or replay them, it keeps running on the assumption
/// that they happened.
pub struct NodeImage {
    export: NodeExport,
    write_through: bool,
}

impl ReadImage for NodeImage {
    fn size(&self) -> u64 {
        self.export.size()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.export.read(offset, buf).await
    }

    fn resident_pieces(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        self.export.read_files(offset, len, out)
    }

    /// A template's bytes are its manifest's; an overlay's change under its users.
    fn content_id(&self) -> Option<u64> {
        match &self.export {
            NodeExport::Template(t) => Some(t.replica().content_id()),
            NodeExport::Overlay { .. } => None,
        }
    }
}

impl WriteImage for NodeImage {
    fn writable(&self) -> bool {
        !self.export.read_only()
    }

    /// Overlays too: every opener shares one overlay, and a flush by any of them
    /// flushes all of it.
    fn shared(&self) -> bool {
        true
    }

    async fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let fua = fua || self.write_through;
        self.export.write(offset, data, fua).await
    }

    async fn flush(&self) -> io::Result<()> {
        self.export.flush().await
    }
}

impl SparseImage for NodeImage {
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let fua = fua || self.write_through;
        self.export.trim(offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let fua = fua || self.write_through;
        self.export.write_zeroes(offset, len, fua).await
    }

    async fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        Ok(self.export.extents(offset, len))
    }
}

impl PrefetchImage for NodeImage {
    fn prefetch(&self, offset: u64, len: u64) {
        self.export.prefetch(offset, len)
    }
}

/// The node's templates and sandboxes, as one frontend opens them. Answers
/// `open_local` and `list_local` from local state only: templates appear once this node
/// knows them (the daemon learns the store's templates in the background), whether
/// their replica is in memory or only their manifest on disk.
pub struct NodeImages {
    node: Arc<Node>,
    /// Put before the opener's name to make the user shown in status ("nbd client ").
    user_prefix: &'static str,
    /// Whether the images it opens write through ([`NodeImage`]).
    write_through: bool,
}

impl NodeImages {
    /// The images of the NBD server: users are "nbd client ADDRESS".
    pub fn nbd(node: Arc<Node>) -> NodeImages {
        NodeImages {
            node,
            user_prefix: "nbd client ",
            write_through: false,
        }
    }

    /// The images of the FUSE mount: users are the files ("fuse file sandboxes/sb1").
    pub fn fuse(node: Arc<Node>) -> NodeImages {
        NodeImages {
            node,
            user_prefix: "",
            write_through: false,
        }
    }

    /// The images behind kernel block devices: users are the devices ("kernel
    /// /dev/nbd0", the connection's peer name), and with `write_through` (devices that
    /// outlive the daemon) writes are durable before they are acknowledged.
    pub fn kernel(node: Arc<Node>, write_through: bool) -> NodeImages {
        NodeImages {
            node,
            user_prefix: "",
            write_through,
        }
    }

    fn image(&self, export: NodeExport) -> Arc<NodeImage> {
        Arc::new(NodeImage {
            export,
            write_through: self.write_through,
        })
    }
}

/// The metric label of an operation: the NBD command's name for the NBD server and the
/// kernel devices, `fuse_` and the operation for the FUSE files.
fn label(door: Door, op: Op) -> &'static str {
    match (door, op) {
        (Door::Nbd, Op::Read) => "read",
        (Door::Nbd, Op::Write) => "write",
        (Door::Nbd, Op::Flush) => "flush",
        (Door::Nbd, Op::Trim) => "trim",
        (Door::Nbd, Op::WriteZeroes) => "write_zeroes",
        (Door::Nbd, Op::Extents) => "block_status",
        (Door::Nbd, Op::Prefetch) => "cache",
        (Door::Nbd, Op::Disconnect) => "disc",
        (Door::Fuse, Op::Read) => "fuse_read",
        (Door::Fuse, Op::Write) => "fuse_write",
        (Door::Fuse, Op::Flush) => "fuse_flush",
        (Door::Fuse, Op::Trim) => "fuse_trim",
        (Door::Fuse, Op::WriteZeroes) => "fuse_write_zeroes",
        (Door::Fuse, Op::Extents) => "fuse_extents",
        (Door::Fuse, Op::Prefetch) => "fuse_prefetch",
        (Door::Fuse, Op::Disconnect) => "fuse_disconnect",
        (Door::Ublk, Op::Read) => "ublk_read",
        (Door::Ublk, Op::Write) => "ublk_write",
        (Door::Ublk, Op::Flush) => "ublk_flush",
        (Door::Ublk, Op::Trim) => "ublk_trim",
        (Door::Ublk, Op::WriteZeroes) => "ublk_write_zeroes",
        (Door::Ublk, Op::Extents) => "ublk_extents",
        (Door::Ublk, Op::Prefetch) => "ublk_prefetch",
        (Door::Ublk, Op::Disconnect) => "ublk_disconnect",
    }
}

impl Images for NodeImages {
    type Image = NodeImage;

    async fn open(&self, name: &str, user: &str) -> Result<Arc<NodeImage>, OpenError> {
        if lazyblk_cache::validate_id(name).is_err() {
            return Err(OpenError::Unknown);
        }
        let user = format!("{}{user}", self.user_prefix);
        match NodeExport::open(&self.node, name, user).await {
            Ok(export) => Ok(self.image(export)),
            Err(TemplateError::UnknownTemplate(..)) => Err(OpenError::Unknown),
            Err(e) => {
                tracing::warn!(image = name, error = %e, "image unavailable");
                Err(OpenError::Unavailable(e.to_string()))
            }
        }
    }

    fn open_local(&self, kind: Kind, name: &str, user: &str) -> Result<Arc<NodeImage>, OpenError> {
        let user = format!("{}{user}", self.user_prefix);
        let export = match kind {
            Kind::Template => {
                let replica = self.node.templates.known(name).ok_or(OpenError::Unknown)?;
                if let Err(e) = self.node.templates.trusted(name) {
                    tracing::warn!(template = name, error = %e, "template refused");
                    return Err(OpenError::Unavailable(e.to_string()));
                }
                self.node.replays.opened(&replica);
                NodeExport::Template(replica.lease(user))
            }
            Kind::Sandbox => {
                let sandbox = self.node.sandboxes.get(name).ok_or(OpenError::Unknown)?;
                self.node.replays.opened(sandbox.template());
                let lease = sandbox.users.lease(user);
                NodeExport::Overlay {
                    sandbox,
                    _lease: lease,
                }
            }
        };
        Ok(self.image(export))
    }

    async fn list(&self) -> Vec<Listing> {
        let mut all: Vec<Listing> = self
            .node
            .sandboxes
            .all()
            .iter()
            .map(|s| Listing {
                name: s.id().to_string(),
                kind: Kind::Sandbox,
                description: format!("sandbox overlay over {} (read-write)", s.template().id()),
            })
            .collect();
        all.extend(
            self.node
                .templates
                .names()
                .await
                .into_iter()
                .map(|name| Listing {
                    name,
                    kind: Kind::Template,
                    description: "template (read-only)".to_string(),
                }),
        );
        all
    }

    fn list_local(&self, kind: Kind) -> Vec<String> {
        match kind {
            // A template this node refuses (--trusted-keys) is not listed.
            Kind::Template => self.node.templates.servable_ids(),
            Kind::Sandbox => self
                .node
                .sandboxes
                .all()
                .iter()
                .map(|s| s.id().to_string())
                .collect(),
        }
    }

    fn observe(&self, door: Door, op: Op, bytes: u64, elapsed: Duration, ok: bool) {
        self.node
            .metrics
            .nbd_request(label(door, op), bytes, elapsed, ok);
    }

    fn spliced(&self, bytes: u64) {
        self.node.metrics.spliced(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_labels_stay_the_command_names_and_fuse_labels_are_apart() {
        let nbd: std::collections::HashSet<_> =
            Op::ALL.iter().map(|&op| label(Door::Nbd, op)).collect();
        let fuse: std::collections::HashSet<_> =
            Op::ALL.iter().map(|&op| label(Door::Fuse, op)).collect();
        assert_eq!(nbd.len(), Op::ALL.len());
        assert_eq!(fuse.len(), Op::ALL.len());
        assert!(nbd.is_disjoint(&fuse));
        assert_eq!(label(Door::Nbd, Op::Extents), "block_status");
        assert_eq!(label(Door::Fuse, Op::Read), "fuse_read");
    }
}
