//! Low-priority threads for the CPU and disk work of background fills (hashing, writing
//! chunk files), so that on a busy node the scheduler gives demand reads the CPU first.
//!
//! The threads run at the lowest scheduling priority (nice 19), and as SCHED_IDLE (run
//! only on a CPU nothing else wants) for jobs submitted while readers are active. A
//! profile of reads during a fill (perf, the B5 bench) found the readers waiting behind
//! these threads; nice 19 alone kept them waiting, while SCHED_IDLE all the time would
//! starve a fill that nobody reads behind. They are few: fills are bounded by the
//! network and the disk, not by parallel hashing.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// Threads in the background pool: two keep a fill's hashing and writing overlapped.
const BACKGROUND_THREADS: usize = 2;
/// The nice value of background threads: the lowest priority Linux has.
const BACKGROUND_NICE: i32 = 19;

/// Work, and whether it must yield the CPU to anything else (SCHED_IDLE).
type Job = (bool, Box<dyn FnOnce() + Send>);

fn pool() -> &'static Mutex<mpsc::Sender<Job>> {
    static POOL: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for n in 0..BACKGROUND_THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lazyblk-bg-{n}"))
                .spawn(move || {
                    lower_priority();
                    let mut idle = false;
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok((yielding, job)) => {
                                if yielding != idle {
                                    idle = yielding;
                                    set_idle(idle);
                                }
                                job()
                            }
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a background thread");
            }
        }
        Mutex::new(tx)
    })
}

/// Makes the calling thread the lowest priority (Linux nice values are per thread).
fn lower_priority() {
    // SAFETY: setpriority with PRIO_PROCESS and a thread id only changes that thread's
    // nice value; gettid has no preconditions.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the priority of a background thread");
    }
}

/// Makes the calling thread SCHED_IDLE (`idle`) or a normal thread again (its nice
/// value stays 19).
fn set_idle(idle: bool) {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 names the calling thread; `param` is a valid sched_param.
    let result = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), idle, "cannot change a background thread's scheduling policy");
    }
}

/// Runs `f` on a background thread and waits for its result. Falls back to the
/// blocking pool if the background threads are gone.
pub async fn run<T, F>(yielding: bool, f: F) -> Result<T, String>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = (
        yielding,
        Box::new(move || {
            let _ = tx.send(f());
        }),
    );
    let sent = pool().lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if let Err(mpsc::SendError((_, job))) = sent {
        tokio::task::spawn_blocking(job);
    }
    rx.await.map_err(|_| "background job dropped".to_string())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let results =
            futures::future::join_all((0..10).map(|i| super::run(i % 2 == 0, move || i * 2))).await;
        let values: Vec<i32> = results.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(values, (0..10).map(|i| i * 2).collect::<Vec<_>>());
    }
}
