//! One ublk device: created or recovered on a thread of its own (libublk's control
//! commands block), removed under a deadline.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lazyblk_image::{BufferPool, Images, ReadImage, WriteImage};
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use tokio::runtime::Handle;

use crate::control::{describe, init_control_ring, panic_text};
use crate::serve::{serve_queue, Target};
use crate::{block_path, UblkError};

/// The most hardware queues a device gets: one per core up to this. Each queue is a
/// thread with `depth` request buffers; past 16 the buffers cost more than the
/// parallelism gives for one image.
pub const MAX_QUEUES: u16 = 16;

/// Requests in flight per queue: deep enough for qd32 on one core's queue.
pub const QUEUE_DEPTH: u16 = 64;

/// The largest request (the kernel splits larger ones): 256 KiB, so one queue's
/// buffers are 16 MiB of address space at most, touched only as requests use them.
const IO_BUF_BYTES: u32 = 256 << 10;

/// How long a control command (add, start, recovery, stop, delete) may take by
/// default. Generous: START_USER_RECOVERY waits (libublk retries EBUSY for 30 s) until
/// the kernel has noticed the old daemon's death, which it checks every few seconds.
pub const DEFAULT_CONTROL_DEADLINE: Duration = Duration::from_secs(45);

/// The device flags: user recovery with the I/O in flight at a crash reissued to the
/// next daemon rather than failed (reissuing a block request is safe: a write's bytes
/// are the same, and none was acknowledged yet).
const CTRL_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// The target name the kernel and `ublk list` show.
const TARGET_NAME: &str = "lazyblk";

/// How a device is made.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Hardware queues; 0 means one per core up to [`MAX_QUEUES`].
    pub queues: u16,
    /// The deadline of each control command.
    pub control_deadline: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 0,
            control_deadline: DEFAULT_CONTROL_DEADLINE,
        }
    }
}

impl DeviceOptions {
    /// The queues a new device gets.
    pub fn queues(&self) -> u16 {
        if self.queues > 0 {
            return self.queues.min(MAX_QUEUES);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        u16::try_from(cores)
            .unwrap_or(MAX_QUEUES)
            .clamp(1, MAX_QUEUES)
    }
}

/// How a device's queues ended, once they have.
type Ended = Arc<Mutex<Option<Result<(), String>>>>;

/// A ublk device this process serves.
pub struct UblkDevice {
    id: u32,
    size: u64,
    read_only: bool,
    queues: u16,
    ctrl: Arc<UblkCtrl>,
    /// Runs libublk's `run_target` until the queues end.
    server: Option<JoinHandle<()>>,
    ended: Ended,
    deadline: Duration,
}

/// What the device thread tells the caller while it starts.
enum Progress {
    /// The control device exists (its id) and this is its handle.
    Created(Arc<UblkCtrl>),
    /// START_DEV (or END_USER_RECOVERY) completed: `/dev/ublkbN` serves.
    Started,
    Failed(UblkError),
}

impl UblkDevice {
    /// Creates a device serving `image` (opened from `images`, whose `observe` gets
    /// each request) and returns once `/dev/ublkbN` serves. Blocks: call it off the
    /// async runtime; `runtime` runs the image's calls.
    /// `id`: N of `/dev/ublkbN` (the kernel refuses one in use with EEXIST), or the
    /// kernel's choice.
    pub fn add<S: Images>(
        images: Arc<S>,
        image: Arc<S::Image>,
        runtime: Handle,
        id: Option<u32>,
        options: &DeviceOptions,
    ) -> Result<UblkDevice, UblkError> {
        let size = image.size();
        check_size(size)?;
        let queues = options.queues();
        let what = id.map_or_else(|| "a new ublk device".to_string(), block_path);
        let id = match id {
            Some(id) => i32::try_from(id).map_err(|_| UblkError::Control {
                device: block_path(id),
                step: "ADD_DEV",
                detail: "device id out of range".into(),
            })?,
            None => -1,
        };
        let build = move || {
            libublk::ctrl::UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(id)
                .nr_queues(queues)
                .depth(QUEUE_DEPTH)
                .io_buf_bytes(IO_BUF_BYTES)
                .ctrl_flags(CTRL_FLAGS)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
        };
        Self::run("ADD_DEV", what, build, images, image, runtime, options)
    }

    /// Takes back device `id`, left by an earlier run of this daemon (killed or
    /// restarted): START_USER_RECOVERY, new queues serving `image`, END_USER_RECOVERY.
    /// The I/O the kernel queued meanwhile is served then.
    pub fn recover<S: Images>(
        id: u32,
        images: Arc<S>,
        image: Arc<S::Image>,
        runtime: Handle,
        options: &DeviceOptions,
    ) -> Result<UblkDevice, UblkError> {
        check_size(image.size())?;
        let signed = i32::try_from(id).map_err(|_| UblkError::Control {
            device: block_path(id),
            step: "recover",
            detail: "no such device id".into(),
        })?;
        let build = move || {
            // The device's queues, depth and buffer size, from the kernel: a control
            // for recovery is made with them (libublk sizes its queue tables by them).
            let info = UblkCtrl::new_simple(signed)?.dev_info();
            let ctrl = UblkCtrl::new(
                Some(TARGET_NAME.to_string()),
                signed,
                u32::from(info.nr_hw_queues),
                u32::from(info.queue_depth),
                info.max_io_buf_bytes,
                CTRL_FLAGS,
                0,
                UblkFlags::UBLK_DEV_F_RECOVER_DEV,
            )?;
            ctrl.start_user_recover()?;
            Ok(ctrl)
        };
        Self::run(
            "START_USER_RECOVERY",
            block_path(id),
            build,
            images,
            image,
            runtime,
            options,
        )
    }

    /// Runs `build` and then the device's queues on a thread; waits (each step under
    /// the deadline) until it serves.
    fn run<S: Images>(
        first_step: &'static str,
        what: String,
        build: impl FnOnce() -> Result<UblkCtrl, libublk::UblkError> + Send + 'static,
        images: Arc<S>,
        image: Arc<S::Image>,
        runtime: Handle,
        options: &DeviceOptions,
    ) -> Result<UblkDevice, UblkError> {
        let read_only = !image.writable();
        let size = image.size();
        let block_size = image.block_size();
        let ended: Ended = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel();
        let thread_ended = ended.clone();
        let what_for_thread = what.clone();
        let target = Arc::new(Target {
            images,
            image,
            runtime,
            pool: BufferPool::new(),
            read_only,
        });
        let server = std::thread::Builder::new()
            .name("ublk-device".into())
            .spawn(move || {
                let ctrl = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
                    .unwrap_or_else(|panic| {
                        tracing::error!(
                            panic = panic_text(&*panic),
                            "libublk panicked making a control"
                        );
                        Err(libublk::UblkError::OtherError(-libc::EIO))
                    }) {
                    Ok(ctrl) => Arc::new(ctrl),
                    Err(libublk::UblkError::OtherError(e)) if e == -libc::EEXIST => {
                        let _ = tx.send(Progress::Failed(UblkError::IdTaken {
                            device: what_for_thread,
                        }));
                        return;
                    }
                    Err(error) => {
                        let _ = tx.send(Progress::Failed(UblkError::Control {
                            device: what_for_thread,
                            step: first_step,
                            detail: describe(&error),
                        }));
                        return;
                    }
                };
                // Dropping the last handle must never delete the device: a daemon
                // that exits leaves it for the next run to recover. Removal is explicit.
                ctrl.disown();
                let _ = tx.send(Progress::Created(ctrl.clone()));
                let id = ctrl.dev_info().dev_id;
                let init = |dev: &mut UblkDev| {
                    set_params(dev, size, block_size, read_only);
                    Ok(())
                };
                let started = tx.clone();
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    ctrl.run_target(
                        init,
                        move |qid, dev: &UblkDev| serve_queue(qid, dev, target.clone()),
                        move |_: &UblkCtrl| {
                            let _ = started.send(Progress::Started);
                        },
                    )
                }))
                .unwrap_or_else(|panic| {
                    tracing::error!(
                        panic = panic_text(&*panic),
                        "libublk panicked serving a device"
                    );
                    Err(libublk::UblkError::OtherError(-libc::EIO))
                });
                let how = match served {
                    Ok(_) => Ok(()),
                    Err(error) => {
                        let error = UblkError::Control {
                            device: block_path(id),
                            step: "START_DEV",
                            detail: describe(&error),
                        };
                        let _ = tx.send(Progress::Failed(UblkError::Control {
                            device: block_path(id),
                            step: "START_DEV",
                            detail: error.to_string(),
                        }));
                        Err(error.to_string())
                    }
                };
                *thread_ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
            })
            .map_err(|e| UblkError::Control {
                device: what.clone(),
                step: "spawning its thread",
                detail: e.to_string(),
            })?;
        let deadline = options.control_deadline;
        let missed = |device: String, step| UblkError::Deadline {
            device,
            step,
            deadline,
        };
        let ctrl = match rx.recv_timeout(deadline) {
            Ok(Progress::Created(ctrl)) => ctrl,
            Ok(Progress::Failed(error)) => return Err(error),
            Ok(Progress::Started) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(UblkError::Control {
                    device: what,
                    step: first_step,
                    detail: "the device thread ended without a word".into(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(missed(what, first_step)),
        };
        let id = ctrl.dev_info().dev_id;
        match rx.recv_timeout(deadline) {
            Ok(Progress::Started) => {}
            Ok(Progress::Failed(error)) => return Err(error),
            Ok(Progress::Created(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(UblkError::Control {
                    device: block_path(id),
                    step: "START_DEV",
                    detail: "the device thread ended without a word".into(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(missed(block_path(id), "START_DEV"))
            }
        }
        Ok(UblkDevice {
            id,
            size,
            read_only,
            queues: ctrl.dev_info().nr_hw_queues,
            ctrl,
            server: Some(server),
            ended,
            deadline,
        })
    }

    /// N of `/dev/ublkbN`.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> String {
        block_path(self.id)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Hardware queues (threads) serving it.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// `None` while the queues serve; how they ended otherwise.
    pub fn ended(&self) -> Option<Result<(), String>> {
        if let Some(ended) = self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(ended);
        }
        match &self.server {
            Some(server) if server.is_finished() => Some(Err("its queues ended".into())),
            _ => None,
        }
    }

    /// Stops and deletes the device (STOP_DEV, the queues end, DEL_DEV), each under the
    /// deadline. A missed deadline is returned and the rest is left to its thread.
    pub fn remove(mut self) -> Result<(), UblkError> {
        let id = self.id;
        let ctrl = self.ctrl.clone();
        let server = self.server.take();
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("ublk-remove".into())
            .spawn(move || {
                if let Err(e) = init_control_ring() {
                    let _ = tx.send(("STOP_DEV", Err(("STOP_DEV", e.to_string()))));
                    return;
                }
                let step = |step: &'static str, r: Result<i32, libublk::UblkError>| {
                    r.map(|_| ()).map_err(|e| (step, describe(&e)))
                };
                let stopped = step("STOP_DEV", ctrl.kill_dev());
                let _ = tx.send(("STOP_DEV", stopped.clone()));
                if stopped.is_err() {
                    return;
                }
                if let Some(server) = server {
                    let _ = server.join();
                }
                let _ = tx.send(("queues ending", Ok(())));
                let deleted = step("DEL_DEV", ctrl.del_dev());
                let _ = tx.send(("DEL_DEV", deleted));
            });
        if let Err(e) = spawned {
            return Err(UblkError::Control {
                device: block_path(id),
                step: "spawning its removal thread",
                detail: e.to_string(),
            });
        }
        for expected in ["STOP_DEV", "queues ending", "DEL_DEV"] {
            match rx.recv_timeout(self.deadline) {
                Ok((_, Ok(()))) => {}
                Ok((step, Err((_, detail)))) => {
                    return Err(UblkError::Control {
                        device: block_path(id),
                        step,
                        detail,
                    })
                }
                Err(_) => {
                    return Err(UblkError::Deadline {
                        device: block_path(id),
                        step: expected,
                        deadline: self.deadline,
                    })
                }
            }
        }
        Ok(())
    }
}

/// The device's parameters: size, block sizes, read-only for templates; for
/// sandboxes a volatile cache with FUA (so flushes and FUA writes reach the image) and
/// discard and write-zeroes.
fn set_params(dev: &mut UblkDev, size: u64, block_size: u32, read_only: bool) {
    dev.set_default_params(size);
    // Each tag has its uring_cmd in flight and, while the runtime serves it, the read
    // of its eventfd: room for both in the queue's ring.
    let depth = dev.dev_info.queue_depth.saturating_mul(2);
    dev.tgt.sq_depth = depth;
    dev.tgt.cq_depth = depth;
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let params = &mut dev.tgt.params;
    let physical = block_size.clamp(512, 4096).trailing_zeros() as u8;
    params.basic.physical_bs_shift = physical;
    params.basic.io_min_shift = physical;
    params.basic.io_opt_shift = physical;
    params.basic.max_sectors = max_sectors;
    if read_only {
        params.basic.attrs = sys::UBLK_ATTR_READ_ONLY;
    } else {
        params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: block_size.max(512),
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
}

/// A device is whole 512-byte sectors and not empty.
fn check_size(size: u64) -> Result<(), UblkError> {
    if size == 0 {
        return Err(UblkError::BadImage {
            size,
            reason: "it is empty",
        });
    }
    if !size.is_multiple_of(512) {
        return Err(UblkError::BadImage {
            size,
            reason: "its size is not a multiple of 512 bytes",
        });
    }
    Ok(())
}
