//! The exports behind kernel block devices ([`crate::daemon::attach`]): the node's
//! exports, named by the device that uses them, with writes durable before their ack
//! for devices that outlive the daemon.

use std::sync::Arc;
use std::time::Duration;

use lazyblk_nbd::{Command, Exports, Extent, FileSlices, OpenError};

use crate::daemon::exports::{NbdExports, NodeExport};
use crate::daemon::templates::TemplateError;

/// The node's exports as the kernel's connections open them: those of [`NbdExports`],
/// but the user named in status and refusals is the device itself ("kernel
/// /dev/nbd0"), which is the connection's peer name, and (for devices that outlive the
/// daemon) writes are durable before they are acknowledged.
pub struct KernelExports {
    exports: NbdExports,
    /// Whether every write is made durable before its reply ([`KernelExport`]).
    write_through: bool,
}

impl KernelExports {
    pub fn new(exports: NbdExports, write_through: bool) -> KernelExports {
        KernelExports {
            exports,
            write_through,
        }
    }
}

impl Exports for KernelExports {
    type Export = KernelExport;

    async fn open(&self, name: &str, peer: &str) -> Result<Arc<KernelExport>, OpenError> {
        if lazyblk_cache::validate_id(name).is_err() {
            return Err(OpenError::Unknown);
        }
        match NodeExport::open(&self.exports.node, name, peer.to_owned()).await {
            Ok(export) => Ok(Arc::new(KernelExport {
                export,
                write_through: self.write_through,
            })),
            Err(TemplateError::UnknownTemplate(..)) => Err(OpenError::Unknown),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    async fn list(&self) -> Vec<(String, String)> {
        self.exports.list().await
    }

    fn observe(&self, command: Command, bytes: u64, elapsed: Duration, ok: bool) {
        self.exports.observe(command, bytes, elapsed, ok)
    }

    fn spliced(&self, bytes: u64) {
        self.exports.spliced(bytes)
    }
}

/// An export behind a kernel device. With `write_through`, every write, trim and
/// write-zeroes is made durable before its reply (as if it carried FUA). An overlay
/// keeps the map of what was written in memory until a flush; a client that
/// reconnects after a daemon restart would otherwise find writes it was told were
/// done missing, and the device's file system does not re-read or replay them: it
/// keeps running on the assumption that they happened.
pub struct KernelExport {
    export: NodeExport,
    write_through: bool,
}

impl lazyblk_nbd::Export for KernelExport {
    fn size(&self) -> u64 {
        lazyblk_nbd::Export::size(&self.export)
    }

    fn read_only(&self) -> bool {
        lazyblk_nbd::Export::read_only(&self.export)
    }

    fn can_multi_conn(&self) -> bool {
        lazyblk_nbd::Export::can_multi_conn(&self.export)
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        lazyblk_nbd::Export::read(&self.export, offset, buf).await
    }

    fn read_files(&self, offset: u64, len: u32, out: &mut FileSlices) -> bool {
        lazyblk_nbd::Export::read_files(&self.export, offset, len, out)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let fua = fua || self.write_through;
        lazyblk_nbd::Export::write(&self.export, offset, data, fua).await
    }

    async fn flush(&self) -> std::io::Result<()> {
        lazyblk_nbd::Export::flush(&self.export).await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let fua = fua || self.write_through;
        lazyblk_nbd::Export::trim(&self.export, offset, len, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        let fua = fua || self.write_through;
        lazyblk_nbd::Export::write_zeroes(&self.export, offset, len, fua).await
    }

    async fn cache(&self, offset: u64, len: u64) -> std::io::Result<()> {
        lazyblk_nbd::Export::cache(&self.export, offset, len).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        lazyblk_nbd::Export::block_status(&self.export, offset, len).await
    }
}
