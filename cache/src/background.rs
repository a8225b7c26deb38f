//! Low-priority threads for the CPU and disk work of background fills (hashing, writing
//! chunk files), so that on a busy node the scheduler gives demand reads the CPU first.
//!
//! The threads run at the lowest scheduling priority (nice 19), and as SCHED_IDLE (run
//! only on a CPU nothing else wants) for jobs submitted while readers are active. A
//! profile of reads during a fill (perf, the B5 bench) found the readers waiting behind
//! these threads; nice 19 alone kept them waiting, while SCHED_IDLE all the time would
//! starve a fill that nobody reads behind. They are few: fills are bounded by the
//! network and the disk, not by parallel hashing.
//!
//! A fill's fetches themselves (their HTTP receive) run on a runtime of one worker of
//! their own ([`spawn`]), under the same rule. A demand read never waits on one: it
//! fetches the chunk itself ([`crate::fetch`]).
//!
//! Leaving SCHED_IDLE needs CAP_SYS_NICE or an RLIMIT_NICE of at least 1 (Linux counts
//! SCHED_IDLE as nice 20). Where neither is there (a daemon run without root), these
//! threads stay at nice 19 and never become SCHED_IDLE, rather than staying idle for
//! good after the first reader. [`start`] makes the threads from a normal thread, so
//! none inherits SCHED_IDLE from the thread that first needs them.

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
                    set_idle(false);
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok((yielding, job)) => {
                                be_idle(yielding);
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

/// Whether this process may make a thread SCHED_IDLE and back (see the module
/// header): probed once, on a thread of its own, after raising RLIMIT_NICE's soft limit
/// to 1 where the hard limit allows.
fn idle_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        // SAFETY: getrlimit/setrlimit on a valid, owned rlimit struct.
        unsafe {
            let mut limit = std::mem::zeroed::<libc::rlimit>();
            if libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0
                && limit.rlim_cur < 1
                && limit.rlim_max >= 1
            {
                limit.rlim_cur = 1;
                libc::setrlimit(libc::RLIMIT_NICE, &limit);
            }
        }
        let probe = std::thread::spawn(|| {
            lower_priority();
            policy(libc::SCHED_IDLE) && policy(libc::SCHED_OTHER)
        });
        let allowed = probe.join().unwrap_or(false);
        if !allowed {
            tracing::info!("background fill threads stay at nice 19: leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE >= 1");
        }
        allowed
    })
}

/// Sets the calling thread's scheduling policy; whether it took.
fn policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: 0 names the calling thread; `param` is a valid sched_param.
    unsafe { libc::sched_setscheduler(0, policy, &param) == 0 }
}

/// Makes the calling thread SCHED_IDLE (`idle`) or a normal thread again (its nice
/// value stays 19); whether it took. Never makes a thread idle that could not come
/// back.
fn set_idle(idle: bool) -> bool {
    if !idle_allowed() {
        return !idle;
    }
    let took = policy(if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    });
    if !took {
        tracing::debug!(error = %std::io::Error::last_os_error(), idle, "cannot change a background thread's scheduling policy");
    }
    took
}

/// Starts the background threads and runtime now, from the calling (normal) thread.
pub fn start() {
    idle_allowed();
    pool();
    runtime();
}

/// The runtime that moves the bytes of background fetches: one worker thread of its
/// own at nice 19, SCHED_IDLE while readers are active. A fill's HTTP receive ran on the
/// runtime threads that answer NBD requests, and the profile of reads during a fill
/// (B5) showed cached reads waiting behind it; here it waits for them instead.
/// Connections it opens are driven by it alone: fetches on it use their own HTTP
/// clients ([`crate::transport::HttpClients`]), so a demand read never rides a
/// connection that this low-priority thread drives.
fn runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let built = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(4)
                .thread_name("lazyblk-fill-io")
                .on_thread_start(|| {
                    lower_priority();
                    set_idle(false);
                    ON_BACKGROUND.with(|b| b.set(true));
                })
                .enable_all()
                .build();
            built
                .map_err(|e| tracing::warn!(error = %e, "cannot start the background fetch runtime; fills share the daemon's"))
                .ok()
        })
        .as_ref()
}

thread_local! {
    /// Whether this thread is SCHED_IDLE now (background threads only).
    static IDLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether this thread belongs to the background runtime.
    static ON_BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the calling background thread SCHED_IDLE or not, with a system call only when
/// that changes.
fn be_idle(idle: bool) {
    if IDLE.with(|i| i.get()) != idle && set_idle(idle) {
        IDLE.with(|i| i.set(idle));
    }
}

/// While alive, the calling thread is not SCHED_IDLE, if it was: held across a lock that
/// foreground threads also take (the chunk index every cached read locks). An idle
/// thread preempted inside such a lock keeps every reader waiting until the CPU has
/// nothing else to run (priority inversion); the B5 profile showed the fill's threads
/// delayed up to 8 ms there. Costs a thread-local read on other threads, and two
/// system calls on an idle background thread.
pub(crate) struct Foreground(bool);

pub(crate) fn foreground() -> Foreground {
    let idle = IDLE.with(|i| i.get());
    if idle {
        be_idle(false);
    }
    Foreground(idle)
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if self.0 {
            be_idle(true);
        }
    }
}

/// Whether the caller runs on the background fetch runtime.
pub fn on_background_runtime() -> bool {
    ON_BACKGROUND.with(|b| b.get())
}

/// Runs `fut` on the background fetch runtime (or, without one, on the caller's).
/// Before each poll the thread is made SCHED_IDLE when `yielding()` says so (readers
/// are active), and a normal thread (at nice 19) otherwise. Every task there is fill
/// work: a demand read never waits on one (see [`crate::fetch`]).
pub fn spawn<F>(
    yielding: impl Fn() -> bool + Send + Unpin + 'static,
    fut: F,
) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime() {
        Some(rt) => rt.spawn(Yielding {
            inner: Box::pin(fut),
            yielding,
        }),
        None => tokio::spawn(fut),
    }
}

/// A future that sets its thread's scheduling policy before each poll.
struct Yielding<F, Y> {
    inner: std::pin::Pin<Box<F>>,
    yielding: Y,
}

impl<F: std::future::Future, Y: Fn() -> bool + Unpin> std::future::Future for Yielding<F, Y> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        be_idle((this.yielding)());
        this.inner.as_mut().poll(cx)
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
    /// The calling thread's (name, nice value, SCHED_IDLE or not).
    fn thread_state() -> (String, i32, bool) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        // SAFETY: plain queries of the calling thread's scheduling.
        let (nice, policy) = unsafe {
            let tid = libc::gettid();
            (
                libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
                libc::sched_getscheduler(0),
            )
        };
        (name, nice, policy == libc::SCHED_IDLE)
    }

    #[tokio::test]
    async fn background_fetches_run_on_their_own_low_priority_thread() {
        assert!(!super::on_background_runtime());
        let (name, nice, idle) = super::spawn(|| true, async { thread_state() })
            .await
            .unwrap();
        assert_eq!(name, "lazyblk-fill-io");
        assert_eq!(nice, super::BACKGROUND_NICE);
        // SCHED_IDLE where the process may leave it again (root here), never otherwise.
        assert_eq!(idle, super::idle_allowed(), "yielding work runs SCHED_IDLE");
        // Work that must not yield (a demand reader joined it) makes the thread a
        // normal one again, and it knows it is the background runtime.
        let (_, _, idle, on_background) = super::spawn(|| false, async {
            let (n, p, i) = thread_state();
            (n, p, i, super::on_background_runtime())
        })
        .await
        .unwrap();
        assert!(!idle);
        assert!(on_background);
    }

    #[tokio::test]
    async fn an_idle_thread_holding_a_shared_lock_is_a_normal_thread_meanwhile() {
        let (before, held, after) = super::run(true, || {
            let before = thread_state().2;
            let guard = super::foreground();
            let held = thread_state().2;
            drop(guard);
            (before, held, thread_state().2)
        })
        .await
        .unwrap();
        assert_eq!(
            before,
            super::idle_allowed(),
            "yielding work runs SCHED_IDLE"
        );
        assert!(!held, "SCHED_IDLE while holding a lock readers wait for");
        assert_eq!(after, before, "idle again once the lock is released");
        // On a foreground thread it changes nothing.
        let guard = super::foreground();
        assert!(!thread_state().2);
        drop(guard);
        assert!(!thread_state().2);
    }

    #[tokio::test]
    async fn runs_jobs_and_returns_results() {
        let results =
            futures::future::join_all((0..10).map(|i| super::run(i % 2 == 0, move || i * 2))).await;
        let values: Vec<i32> = results.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(values, (0..10).map(|i| i * 2).collect::<Vec<_>>());
    }
}
