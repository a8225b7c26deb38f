//! `/dev/ublkbN` devices (`lazyblk attach --kind ublk`): the ublk frontend
//! ([`lazyblk_ublk`]) over the node's images, beside the NBD devices of
//! [`super::Attachments`]. Recorded in the same `kernel-devices.json`; a restarted
//! daemon recovers them (user recovery) instead of reconnecting sockets.

use std::collections::BTreeMap;
use std::sync::Arc;

use lazyblk_image::{Images, OpenError, ReadImage};
use lazyblk_ublk::{DeviceOptions, UblkDevice, UblkError};

use super::attachment::AttachmentStatus;
use super::error::AttachError;
use super::restore::{DeviceRecord, Driver};
use super::Attachments;
use crate::daemon::device_state::{self, DeviceState};
use crate::daemon::exports::NodeImages;
use crate::daemon::node_state::phases::now_rfc3339;

/// How many free device ids an attach tries when another process takes each first.
const PICK_TRIES: u32 = 8;

/// How ublk devices are made on this node.
pub struct UblkConfig {
    /// Kernels to offer ublk on besides [`lazyblk_ublk::TESTED_KERNELS`].
    pub extra_kernels: Vec<String>,
    pub device: DeviceOptions,
}

/// The ublk devices, by N of `/dev/ublkbN`.
pub(super) struct UblkDevices {
    pub(super) config: UblkConfig,
    /// Opens exports for the devices; writes are durable before they are acknowledged
    /// (the devices outlive the daemon, so an acknowledged write must survive a kill).
    pub(super) exports: Arc<NodeImages>,
    pub(super) slots: std::sync::Mutex<BTreeMap<u32, UblkSlot>>,
}

pub(super) enum UblkSlot {
    Attaching,
    Attached(UblkAttachment),
}

pub(super) struct UblkAttachment {
    export: String,
    device: UblkDevice,
    attached_at: String,
}

impl UblkAttachment {
    fn status(&self) -> AttachmentStatus {
        let ended = self.device.ended();
        let (state, error) = match ended {
            None => (DeviceState::Connected, None),
            Some(Ok(())) => (DeviceState::Dead, Some("stopped".to_string())),
            Some(Err(e)) => (DeviceState::Dead, Some(e)),
        };
        AttachmentStatus {
            device: self.device.path(),
            index: self.device.id(),
            export: self.export.clone(),
            kind: device_state::kind(self.device.read_only()),
            link: "ublk".into(),
            state,
            size: self.device.size(),
            read_only: self.device.read_only(),
            connected: state == DeviceState::Connected,
            error,
            attached_at: self.attached_at.clone(),
            survives_restart: true,
            connections: u32::from(self.device.queues()),
        }
    }

    fn record(&self) -> DeviceRecord {
        DeviceRecord {
            index: self.device.id(),
            export: self.export.clone(),
            read_only: self.device.read_only(),
            connections: u32::from(self.device.queues()),
            attached_at: self.attached_at.clone(),
            driver: Driver::Ublk,
        }
    }
}

impl From<UblkError> for AttachError {
    fn from(e: UblkError) -> Self {
        AttachError::Ublk(e)
    }
}

/// Descriptors the daemon keeps for everything but ublk devices (listeners, clients,
/// cache files) when it says how many devices its descriptor limit leaves room for.
const RESERVED_FDS: u64 = 4096;

impl UblkDevices {
    pub(super) fn new(config: UblkConfig, exports: Arc<NodeImages>) -> UblkDevices {
        if lazyblk_ublk::check(&config.extra_kernels).is_ok() {
            let limits =
                lazyblk_ublk::Limits::read(config.device.queues(), lazyblk_ublk::QUEUE_DEPTH);
            let by_nofile = limits.devices_by_nofile(RESERVED_FDS);
            tracing::info!(ublks_max = ?limits.ublks_max, nofile = ?limits.nofile, fds_per_device = limits.fds_per_device, devices_by_nofile = ?by_nofile, "ublk offered on this kernel");
            if let (Some(by_nofile), Some(ublks_max)) = (by_nofile, limits.ublks_max) {
                if by_nofile < ublks_max {
                    tracing::warn!(nofile = ?limits.nofile, fds_per_device = limits.fds_per_device, ublks_max, "the descriptor limit (LimitNOFILE) leaves room for only {by_nofile} ublk devices of the driver's {ublks_max}: raise LimitNOFILE");
                }
            }
        }
        UblkDevices {
            config,
            exports,
            slots: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub(super) fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, UblkSlot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn list(&self) -> Vec<AttachmentStatus> {
        self.slots()
            .values()
            .filter_map(|slot| match slot {
                UblkSlot::Attached(a) => Some(a.status()),
                UblkSlot::Attaching => None,
            })
            .collect()
    }

    pub(super) fn records(&self) -> Vec<DeviceRecord> {
        self.slots()
            .values()
            .filter_map(|slot| match slot {
                UblkSlot::Attached(a) => Some(a.record()),
                UblkSlot::Attaching => None,
            })
            .collect()
    }

    /// Reserves `requested` or the first id neither this daemon nor the kernel uses.
    fn reserve(&self, requested: Option<u32>, skip: &[u32]) -> Result<u32, AttachError> {
        let mut slots = self.slots();
        let id = match requested {
            Some(id) => {
                if slots.contains_key(&id) || char_device_exists(id) {
                    return Err(AttachError::UblkBusy(id));
                }
                id
            }
            None => (0..u32::from(u16::MAX))
                .find(|id| {
                    !slots.contains_key(id) && !skip.contains(id) && !char_device_exists(*id)
                })
                .ok_or(AttachError::UblkBusy(u32::from(u16::MAX)))?,
        };
        slots.insert(id, UblkSlot::Attaching);
        Ok(id)
    }
}

/// Whether the kernel has ublk device `id` (ours or anyone's).
fn char_device_exists(id: u32) -> bool {
    std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

fn open_error(export: &str, e: OpenError) -> AttachError {
    match e {
        OpenError::Unknown => AttachError::UnknownExport(export.to_string()),
        OpenError::Unavailable(why) => AttachError::Unavailable {
            export: export.to_string(),
            why,
        },
    }
}

impl Attachments {
    /// `lazyblk attach --kind ublk`: a new `/dev/ublkbN` serving `export`.
    pub(super) async fn attach_ublk(
        &self,
        export: &str,
        device: Option<&str>,
    ) -> Result<AttachmentStatus, AttachError> {
        let extra = self.ublk.config.extra_kernels.clone();
        super::blocking_ublk(move || lazyblk_ublk::check(&extra)).await??;
        if let Some(detail) = crate::daemon::mount_namespace::placement().ublk_refusal() {
            return Err(UblkError::MountNamespace { detail }.into());
        }
        let requested = match device {
            Some(name) => Some(
                lazyblk_ublk::parse_device(name)
                    .ok_or_else(|| AttachError::UblkName(name.to_string()))?,
            ),
            None => None,
        };
        let mut skip = Vec::new();
        loop {
            let id = self.ublk.reserve(requested, &skip)?;
            let added = self.add_ublk(id, export).await;
            match added {
                Ok(attachment) => {
                    let status = attachment.status();
                    tracing::info!(
                        device = status.device,
                        export,
                        size = status.size,
                        read_only = status.read_only,
                        queues = status.connections,
                        "attached ublk device"
                    );
                    self.ublk.slots().insert(id, UblkSlot::Attached(attachment));
                    self.save();
                    return Ok(status);
                }
                Err(e) => {
                    self.ublk.slots().remove(&id);
                    // Another process took the id between the look and the add.
                    let taken = matches!(&e, AttachError::Ublk(UblkError::IdTaken { .. }));
                    if taken && requested.is_none() && (skip.len() as u32) < PICK_TRIES {
                        skip.push(id);
                        continue;
                    }
                    tracing::warn!(device = lazyblk_ublk::block_path(id), export, error = %e, "attaching a ublk device failed");
                    return Err(e);
                }
            }
        }
    }

    async fn add_ublk(&self, id: u32, export: &str) -> Result<UblkAttachment, AttachError> {
        let user = format!("kernel {}", lazyblk_ublk::block_path(id));
        let image = self
            .ublk
            .exports
            .open(export, &user)
            .await
            .map_err(|e| open_error(export, e))?;
        let images = self.ublk.exports.clone();
        let runtime = tokio::runtime::Handle::current();
        let options = self.ublk.config.device.clone();
        let started = std::time::Instant::now();
        let device = super::blocking_ublk(move || {
            UblkDevice::add(images, image, runtime, Some(id), &options)
        })
        .await??;
        self.metrics
            .device_attach_phase("ublk_start", started.elapsed());
        Ok(UblkAttachment {
            export: export.to_string(),
            device,
            attached_at: now_rfc3339(),
        })
    }

    /// Recovers a recorded ublk device left by the last run.
    pub(super) async fn recover_ublk(&self, record: DeviceRecord) {
        let id = record.index;
        let path = lazyblk_ublk::block_path(id);
        let export = record.export.clone();
        let recovered: Result<UblkAttachment, AttachError> = async {
            if !char_device_exists(id) {
                return Err(AttachError::Ublk(UblkError::Control {
                    device: path.clone(),
                    step: "recover",
                    detail: "the kernel no longer has it".into(),
                }));
            }
            let user = format!("kernel {path}");
            let image = self
                .ublk
                .exports
                .open(&export, &user)
                .await
                .map_err(|e| open_error(&export, e))?;
            let had = recorded_size(id);
            if had.is_some_and(|had| had != image.size()) {
                return Err(AttachError::UblkSizeChanged {
                    device: path.clone(),
                    export: export.clone(),
                    had: had.unwrap_or(0),
                    now: image.size(),
                });
            }
            let images = self.ublk.exports.clone();
            let runtime = tokio::runtime::Handle::current();
            let options = self.ublk.config.device.clone();
            let started = std::time::Instant::now();
            let device = super::blocking_ublk(move || {
                UblkDevice::recover(id, images, image, runtime, &options)
            })
            .await??;
            self.metrics
                .device_attach_phase("ublk_recover", started.elapsed());
            Ok(UblkAttachment {
                export: export.clone(),
                device,
                attached_at: record.attached_at.clone(),
            })
        }
        .await;
        match recovered {
            Ok(attachment) => {
                tracing::info!(device = path, export, "recovered ublk device");
                self.ublk.slots().insert(id, UblkSlot::Attached(attachment));
            }
            Err(error) => {
                let mut reason = error.to_string();
                let gone = matches!(
                    error,
                    AttachError::UnknownExport(_) | AttachError::UblkSizeChanged { .. }
                );
                if gone {
                    // No export serves it any more: delete it rather than leave its
                    // users' I/O queued for ever.
                    let deadline = self.ublk.config.device.control_deadline;
                    match super::blocking_ublk(move || lazyblk_ublk::delete(id, deadline)).await {
                        Ok(Ok(())) => reason.push_str("; deleted"),
                        Ok(Err(e)) => reason.push_str(&format!("; deleting failed: {e}")),
                        Err(e) => reason.push_str(&format!("; deleting failed: {e}")),
                    }
                }
                tracing::warn!(
                    device = path,
                    export,
                    reason,
                    "a ublk device left by the last run cannot be served"
                );
                if !gone && char_device_exists(id) {
                    // Not gone for good (the store unreachable, a missed deadline): the
                    // next start tries again.
                    self.retry
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(record.clone());
                }
                self.lost_list()
                    .push(record.lost(path, "ublk".into(), reason));
            }
        }
    }

    /// `lazyblk detach /dev/ublkbN`.
    pub(super) async fn detach_ublk(
        &self,
        id: u32,
        force: bool,
    ) -> Result<AttachmentStatus, AttachError> {
        let path = lazyblk_ublk::block_path(id);
        let taken = {
            let mut slots = self.ublk.slots();
            match slots.get(&id) {
                Some(UblkSlot::Attaching) => return Err(AttachError::UblkAttaching(path)),
                None => return Err(AttachError::UblkNotAttached(path)),
                Some(UblkSlot::Attached(a)) => {
                    if !force && held(id) {
                        return Err(AttachError::UblkInUse {
                            device: path,
                            export: a.export.clone(),
                        });
                    }
                }
            }
            slots.remove(&id)
        };
        let Some(UblkSlot::Attached(attachment)) = taken else {
            return Err(AttachError::UblkNotAttached(path));
        };
        let status = attachment.status();
        let removed = super::blocking_ublk(move || attachment.device.remove()).await?;
        self.save();
        removed?;
        tracing::info!(
            device = status.device,
            export = status.export,
            "detached ublk device"
        );
        Ok(AttachmentStatus {
            connected: false,
            state: DeviceState::Dead,
            ..status
        })
    }
}

/// The size the kernel shows for `/dev/ublkbN`, from sysfs.
fn recorded_size(id: u32) -> Option<u64> {
    let path = format!("/sys/block/ublkb{id}/size");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
}

/// Whether `/dev/ublkbN` is mounted or held open exclusively (sysfs holders, or an
/// exclusive open refused).
fn held(id: u32) -> bool {
    let holders = format!("/sys/block/ublkb{id}/holders");
    if std::fs::read_dir(holders).is_ok_and(|mut d| d.next().is_some()) {
        return true;
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(lazyblk_ublk::block_path(id))
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
}
