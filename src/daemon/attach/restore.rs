//! What outlives the daemon of its kernel block devices ([`super::Attachments`]): the
//! node's record of them (`kernel-devices.json`), and a restarted daemon taking them
//! back: each recorded device that is still this node's gets new sockets; one whose
//! export is gone is disconnected and reported, and so is one the kernel shows as this
//! node's that the record does not name.

use lazyblk_nbd::kernel::{self, Device, KernelError};
use serde::{Deserialize, Serialize};

use super::attachment::{Attachment, AttachmentStatus, Slot};
use super::error::AttachError;
use super::{blocking, Attachments};
use crate::daemon::device_state::{self, DeviceState};

/// One device as the node's state records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DeviceRecord {
    /// N of `/dev/nbdN`.
    pub(super) index: u32,
    pub(super) export: String,
    pub(super) read_only: bool,
    /// Sockets the device was given.
    pub(super) connections: u32,
    pub(super) attached_at: String,
    /// The driver: records written before ublk existed are NBD devices.
    #[serde(default)]
    pub(super) driver: Driver,
}

/// The kernel driver of a recorded device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Driver {
    #[default]
    Nbd,
    Ublk,
}

impl DeviceRecord {
    /// How an attached `/dev/nbdN` is recorded.
    pub(super) fn of(attachment: &Attachment) -> DeviceRecord {
        DeviceRecord {
            index: attachment.connection.device().0,
            export: attachment.export.clone(),
            read_only: attachment.connection.info().read_only(),
            connections: attachment.connections,
            attached_at: attachment.attached_at.clone(),
            driver: Driver::Nbd,
        }
    }

    /// How a recorded device this start could not serve is listed: dead, with why.
    pub(super) fn lost(
        self,
        device: String,
        link: std::borrow::Cow<'static, str>,
        reason: String,
    ) -> AttachmentStatus {
        AttachmentStatus {
            device,
            index: self.index,
            kind: device_state::kind(self.read_only),
            export: self.export,
            link,
            // Updated from the kernel whenever the list is read.
            state: DeviceState::Dead,
            size: 0,
            read_only: self.read_only,
            connected: false,
            error: Some(reason),
            attached_at: self.attached_at,
            survives_restart: true,
            connections: self.connections,
        }
    }
}

impl Attachments {
    /// Reconnects the devices an earlier run of this node left attached (read from
    /// `kernel-devices.json`). A device that is no longer this node's is forgotten, never
    /// touched; one whose export is gone (or changed size) is disconnected; each that
    /// cannot be served is listed with its reason.
    pub async fn restore(&self) {
        let records = match self.record.load() {
            Ok(records) => records.unwrap_or_default(),
            Err(error) => {
                tracing::warn!(path = %self.record.path().display(), %error, "reading the node's kernel devices; none reconnected");
                return;
            }
        };
        let (ublk, records): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|r| r.driver == Driver::Ublk);
        for record in ublk {
            self.recover_ublk(record).await;
        }
        let recorded: Vec<Device> = records.iter().map(|r| Device(r.index)).collect();
        for record in records {
            let device = Device(record.index);
            let export = record.export.clone();
            tracing::debug!(device = %device, export, connections = record.connections, "reconnecting a recorded kernel device");
            match self.reconnect(device, &record).await {
                Ok(mut attachment) => {
                    let status = attachment.status();
                    tracing::info!(device = %device, export, size = status.size, "reconnected kernel block device");
                    self.slots().insert(device, Slot::Attached(attachment));
                }
                Err(error) => self.lose(device, record, error).await,
            }
        }
        self.disconnect_unrecorded(&recorded).await;
        self.save();
    }

    /// Disconnects and reports devices the kernel shows with this node's backend
    /// identifier that `kernel-devices.json` does not name (the daemon died between the
    /// connect and the record): no export is known to serve them, and left alone they
    /// would hang their users until the dead-connection timeout.
    async fn disconnect_unrecorded(&self, recorded: &[Device]) {
        let backend = self.options.backend.clone();
        let recorded = recorded.to_vec();
        let found = blocking(Device(0), move || {
            device_state::unrecorded(&backend, &recorded)
        })
        .await;
        let orphans = match found {
            Ok(Ok(orphans)) => orphans,
            Ok(Err(error)) => {
                tracing::warn!(%error, "looking for this node's unrecorded kernel devices");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "looking for this node's unrecorded kernel devices");
                return;
            }
        };
        for device in orphans {
            let backend = self.options.backend.clone();
            let disconnected = blocking(device, move || {
                kernel::disconnect_netlink(device, &backend, kernel::DISCONNECT_TIMEOUT)
            })
            .await;
            let mut reason = "attached by this node but not in its record".to_string();
            match disconnected {
                Ok(Ok(())) => reason.push_str("; disconnected"),
                Ok(Err(e)) => reason.push_str(&format!("; disconnecting failed: {e}")),
                Err(e) => reason.push_str(&format!("; disconnecting failed: {e}")),
            }
            tracing::warn!(device = %device, reason, "an unrecorded kernel device of this node");
            self.lost_list().push(AttachmentStatus {
                device: device.to_string(),
                index: device.0,
                export: String::new(),
                kind: "unknown".into(),
                link: device_state::link(true),
                state: DeviceState::Dead,
                size: 0,
                read_only: false,
                connected: false,
                error: Some(reason),
                attached_at: String::new(),
                survives_restart: true,
                connections: 0,
            });
        }
    }

    /// Reports (and where its export is gone, disconnects) a recorded device that a
    /// restart could not serve again.
    async fn lose(&self, device: Device, record: DeviceRecord, error: AttachError) {
        let export = record.export.clone();
        let not_ours = matches!(error, AttachError::Kernel(KernelError::NotOurs { .. }));
        let gone = match &error {
            AttachError::Kernel(KernelError::Handshake { source, .. }) => {
                source.is_unknown_export()
            }
            AttachError::Kernel(KernelError::SizeChanged { .. }) => true,
            _ => false,
        };
        let mut reason = error.to_string();
        if not_ours {
            tracing::info!(device = %device, export, %error, "forgetting a recorded kernel device");
            return;
        }
        if gone {
            let backend = self.options.backend.clone();
            let disconnected = blocking(device, move || {
                kernel::disconnect_netlink(device, &backend, kernel::DISCONNECT_TIMEOUT)
            })
            .await;
            match disconnected {
                Ok(Ok(())) => reason.push_str("; disconnected"),
                Ok(Err(e)) => reason.push_str(&format!("; disconnecting failed: {e}")),
                Err(e) => reason.push_str(&format!("; disconnecting failed: {e}")),
            }
        } else {
            self.retry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(record.clone());
        }
        tracing::warn!(device = %device, export, reason, "a kernel device left by the last run cannot be served");
        self.lost_list()
            .push(record.lost(device.to_string(), device_state::link(true), reason));
    }

    pub(super) fn lost_list(&self) -> std::sync::MutexGuard<'_, Vec<AttachmentStatus>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `kernel-devices.json`: the devices attached now that outlive the daemon, and
    /// those the next run should try again.
    pub(super) fn save(&self) {
        let _writing = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let mut records: Vec<DeviceRecord> = self
            .slots()
            .values()
            .filter_map(|slot| match slot {
                Slot::Attached(a) if a.connection.survives_restart() => Some(DeviceRecord::of(a)),
                _ => None,
            })
            .collect();
        records.extend(self.ublk.records());
        records.extend(
            self.retry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        if let Err(error) = self.record.save(&records) {
            tracing::warn!(path = %self.record.path().display(), %error, "recording the node's kernel devices");
        }
    }
}
