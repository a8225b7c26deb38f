//! Control commands outside a device's own thread: libublk's per-thread control ring,
//! errors in words, and deleting a device no thread of this process serves.

use std::sync::mpsc;
use std::time::Duration;

use libublk::ctrl::UblkCtrl;

use crate::{block_path, UblkError};

/// A libublk error in words, with the errno its `Display` leaves out.
pub(crate) fn describe(error: &libublk::UblkError) -> String {
    match error {
        libublk::UblkError::OtherError(e) => {
            format!("{} ({})", std::io::Error::from_raw_os_error(-e), error)
        }
        other => other.to_string(),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Control commands go through a per-thread io_uring of libublk's, made by a
/// control's constructor on the thread that builds it: a thread that only uses a
/// control made elsewhere (a removal) makes its own first.
pub(crate) fn init_control_ring() -> Result<(), libublk::UblkError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(CONTROL_RING_DEPTH)
                    .map_err(libublk::UblkError::IOError)?,
            );
        }
        Ok(())
    })
}

/// Entries of a control thread's ring: one command at a time is in flight.
const CONTROL_RING_DEPTH: u32 = 16;

/// Stops and deletes device `id`, which no thread of this process serves (left by an
/// earlier run whose export is gone), each command under `deadline`.
pub fn delete(id: u32, deadline: Duration) -> Result<(), UblkError> {
    let signed = i32::try_from(id).map_err(|_| UblkError::Control {
        device: block_path(id),
        step: "DEL_DEV",
        detail: "no such device id".into(),
    })?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ublk-delete".into())
        .spawn(move || {
            let deleted = UblkCtrl::new_simple(signed)
                .and_then(|ctrl| {
                    let _ = ctrl.kill_dev();
                    ctrl.del_dev()
                })
                .map(|_| ())
                .map_err(|e| describe(&e));
            let _ = tx.send(deleted);
        })
        .map_err(|e| UblkError::Control {
            device: block_path(id),
            step: "spawning its removal thread",
            detail: e.to_string(),
        })?;
    match rx.recv_timeout(deadline) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(detail)) => Err(UblkError::Control {
            device: block_path(id),
            step: "DEL_DEV",
            detail,
        }),
        Err(_) => Err(UblkError::Deadline {
            device: block_path(id),
            step: "DEL_DEV",
            deadline,
        }),
    }
}
