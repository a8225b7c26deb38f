//! The node daemon: serves every template of the store as an NBD export (and a FUSE
//! file), fetching chunks on demand; runs background fills; records and publishes
//! traces; answers the HTTP API.
//!
//! # Layout
//! - [`args`]: `lazyblk daemon`'s flags ([`args::DaemonArgs`]), read by [`run`].
//! - [`node`]: the [`node::Node`], the owners below built once and shared.
//! - [`templates`]: the templates this node knows (manifests, learned from the store)
//!   and the node's replica of each, with the sources its chunks come from.
//! - [`sandboxes`]: sandbox overlays (create, delete, reopen at start), and what the
//!   commits under way hold (their sandboxes, their new ids).
//! - [`exports`]: the node's images (`lazyblk-image`), the one implementation every
//!   frontend serves: NBD, the FUSE mount and kernel devices (write-through).
//! - [`commit`]: a sandbox into a new template, and what earlier commits owe settled
//!   at start; [`upload`]: its new chunks to the store in the background
//!   (ORIGIN_ONLY -> UPLOADING -> DURABLE).
//! - [`node_state`]: the node's durable state in one owner: its directory's layout,
//!   each store's durability rule, and the handles of the phases (SQLite), saved
//!   manifests, commit intents, wishes, kernel devices' record and the node's key.
//! - [`resize`]: a template grown into a new one (e2fsck and resize2fs on a scratch
//!   overlay, then a commit).
//! - [`replica`]: a replica of a template (the owner of its phase, last error and
//!   claim on its chunks) and a sandbox, the values the owners keep.
//! - [`membership`]: how the node finds the fleet's live nodes (leases on the store,
//!   or `--peers`), for chunk ownership.
//! - [`registry`]: the id-to-object maps of replicas and sandboxes.
//! - [`users`]: who uses a template or overlay (named when an eviction is refused).
//! - [`trace`]: recording of the first reads of each template.
//! - [`replay`]: a template's boot trace fetched ahead of a cold node's boot.
//! - [`counters`]: Prometheus metrics and per-template byte counts ([`metric_labels`]:
//!   the series' labels; [`template_bytes`]: the counts `status` shows).
//! - [`fill`]: the background fill, the replicas' worker (it moves their phases
//!   through the replica's methods).
//! - [`tls`]: NBD over TLS (the STARTTLS configuration from PEM files).
//! - [`attach`]: kernel block devices (`/dev/nbdN`) connected to exports.
//! - [`api`]: the HTTP API; [`health`]: the node's identity, cache health and scrub.
//! - [`startup`]: the start-up sequence, run in order in one place, and what each
//!   step keeps across a crash.
//! - [`kept`]: the listeners and the FUSE mount kept in systemd's file descriptor
//!   store across restarts (`--fd-store`).

pub mod api;
pub mod args;
pub mod attach;
pub mod commit;
pub mod counters;
pub mod device_state;
pub mod exports;
pub mod fill;
pub mod health;
pub mod kept;
pub mod membership;
pub mod metric_labels;
pub mod mount_namespace;
pub mod node;
pub mod node_state;
pub mod registry;
pub mod replay;
pub mod replica;
pub mod resize;
pub mod sandboxes;
pub mod startup;
pub mod store_links;
pub mod template_bytes;
pub mod templates;
pub mod tls;
pub mod trace;
pub mod upload;
pub mod users;

/// The phases' database by its former name (the commands read [`state::Phase`]).
pub use node_state::phases as state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lazyblk_cache::ChunkCache;
use tokio::sync::watch;

use crate::daemon::args::DaemonArgs;
use crate::daemon::counters::DaemonMetrics;
use crate::daemon::exports::NodeImages;
use crate::daemon::fill::{FillConfig, FillScheduler};
use crate::daemon::node::{Node, NodeConfig};
use crate::daemon::replay::ReplayConfig;
use crate::daemon::startup::Step;
use crate::daemon::trace::TraceTiming;

/// The file-descriptor limit the daemon asks for: open chunk files, NBD connections and
/// FUSE handles all take descriptors.
const WANTED_NOFILE: u64 = 65536;
/// How often replicas are checked for a trace ready to publish.
const TRACE_PUBLISH_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    check_peer_trust(&args)?;
    // First, before anything opens descriptors: systemd's passed ones start at 3.
    let mut keeper = kept::Keeper::from_env(args.fd_store);
    crate::http_server::raise_descriptor_limit(WANTED_NOFILE);
    bound_heap();
    // The fills' low-priority threads, made from this (normal) thread.
    lazyblk_cache::background::start();
    let (chunk_store, state) = startup::open_disk(&args.cache, args.cache_size)?;
    let metrics = Arc::new(DaemonMetrics::new());
    metrics.set_store(&args.store);
    let deadline = Duration::from_secs_f64(args.source_deadline.max(0.1));
    let read_budget = Duration::from_secs_f64(args.read_deadline.max(0.1));
    let cache = Arc::new(
        ChunkCache::new(chunk_store, metrics.clone(), deadline)
            .with_read_budget(read_budget)
            // A fleet member serves peers the stored form of the chunks it fetches.
            .with_stored_forms(args.advertise.is_some() || args.peers.is_some()),
    );
    let store = crate::store::client::connect(
        &args.store,
        args.write_token.clone(),
        args.read_token.clone(),
    )
    .with_context(|| format!("opening the store {}", args.store))?
    .with_member_token(args.member_token.clone());

    if let Some(url) = &args.advertise {
        // Peers send their token to this address: it must be a bare origin.
        crate::store::admission::checked_url(url)
            .map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
    }
    let discovery = match (&args.peers, &args.advertise) {
        (Some(spec), _) => {
            Some(membership::Discovery::parse_peers(spec).map_err(anyhow::Error::msg)?)
        }
        (None, Some(_)) if store.direct().is_some() => {
            tracing::warn!(
                "--advertise without a store server: no membership; give --peers for peers"
            );
            None
        }
        (None, Some(_)) => Some(membership::Discovery::Store),
        (None, None) => None,
    };
    let trusted_keys = match &args.trusted_keys {
        Some(path) => Some(crate::trust::TrustedKeys::open(path)?),
        None => None,
    };
    crate::trust::reload_on_sighup(trusted_keys.clone())
        .context("listening for SIGHUP (to read --trusted-keys again)")?;
    let http_listener = keeper.http_listener(&args.listen).await?;
    let http_addr = http_listener.local_addr()?;
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    let node = Arc::new(
        Node::new(
            cache.clone(),
            store,
            metrics,
            state.clone(),
            NodeConfig {
                advertise: advertise.clone(),
                read_token: args.read_token.clone(),
                peer_token: args.peer_token.clone(),
                membership: args.advertise.is_some() || args.peers.is_some(),
                trace_timing: TraceTiming {
                    window: Duration::from_secs_f64(args.trace_window.max(0.0)),
                    quiet: Duration::from_secs_f64(args.trace_quiet.max(0.0)),
                },
                replay: ReplayConfig {
                    enabled: !args.no_replay,
                    in_flight: args.replay_in_flight.max(1),
                    rate: args.replay_rate,
                    max_run: args.replay_max_run.max(lazyblk_cache::manifest::BLOCK_SIZE),
                },
                upload_delay: Duration::from_secs_f64(args.upload_delay.max(0.0)),
                fuse_dir: args.fuse.clone(),
                trusted_keys,
            },
        )
        .with_context(|| format!("preparing state under {}", args.cache.display()))?,
    );
    let fill = Arc::new(FillScheduler::new(
        &node,
        state.phases().clone(),
        FillConfig {
            concurrency: args.fill_concurrency,
            rate: args.fill_rate,
        },
    ));
    let attachments = Arc::new(attach::Attachments::new(
        node.clone(),
        Duration::from_secs(args.device_dead_timeout),
        args.device_ioctl,
        attach::UblkConfig {
            extra_kernels: args.ublk_kernel.clone(),
            device: lazyblk_ublk::DeviceOptions {
                queues: 0,
                control_deadline: Duration::from_secs(args.ublk_control_deadline.max(1)),
            },
        },
    ));
    let nbd_addr = args
        .nbd
        .clone()
        .unwrap_or_else(|| format!("unix:{}", args.cache.join("nbd.sock").display()));
    let (restored, nbd_listener) = startup::restore(
        &node,
        &fill,
        &attachments,
        bind_nbd(&mut keeper, &nbd_addr, &args),
    )
    .await?;
    mount_namespace::settle().await;
    let nbd_config = lazyblk_nbd::ServerConfig {
        max_connections: args.nbd_max_connections,
        handshake_timeout: Duration::from_secs_f64(args.nbd_handshake_timeout.max(0.1)),
        max_bytes_in_flight: args.nbd_max_bytes_in_flight,
        keep_socket_file: keeper.enabled(),
        ..lazyblk_nbd::ServerConfig::default()
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let api = api::router(api::ApiState {
        node: node.clone(),
        fill: fill.clone(),
        attachments: attachments.clone(),
        peer_token: args.peer_token.clone(),
        fleet: args.advertise.is_some() || args.peers.is_some(),
        peer_budget: Arc::new(api::PeerBudget::new(args.peer_max_bytes_in_flight)),
        write_token: args.write_token.clone(),
        scrubs: Arc::default(),
    });
    let http = tokio::spawn(crate::http_server::serve(
        http_listener,
        api,
        args.http.limits(),
        shutdown(shutdown_rx.clone()),
    ));
    let nbd_tls = tls::setup(&args)?;
    let nbd = tokio::spawn(lazyblk_nbd::serve_with_tls(
        nbd_listener,
        Arc::new(NodeImages::nbd(node.clone())),
        nbd_config,
        nbd_tls,
        shutdown(shutdown_rx.clone()),
    ));
    if let Some(discovery) = discovery.clone() {
        if let Some(peers) = node.peers.clone() {
            tokio::spawn(membership::run(
                discovery,
                node.clone(),
                fill.clone(),
                peers,
                shutdown_rx.clone(),
            ));
        }
    }
    tokio::spawn(publish_traces(node.clone(), shutdown_rx.clone()));
    tokio::spawn(fill.clone().supervise(shutdown_rx.clone()));
    tokio::spawn(learn_templates(node.clone(), shutdown_rx.clone()));
    let fuse = match &args.fuse {
        Some(dir) => Some(keeper.fuse_mount(dir, node.clone())?),
        None => None,
    };
    Step::Serving.reached();
    let keep_across_restarts = keeper.enabled();
    keeper.release_unused();

    tracing::info!(
        http = %http_addr, nbd = %nbd_addr, node_id = %node.node_id, cache = %args.cache.display(),
        store = %args.store, advertise = %advertise, restored_templates = restored.templates,
        sandboxes = restored.sandboxes,
        fuse = ?args.fuse.as_ref().map(|d| d.display().to_string()),
        cached_chunks = cache.usage().chunks, "lazyblk daemon ready"
    );
    crate::notify::ready(&format!("serving NBD on {nbd_addr}, HTTP on {http_addr}"));

    wait_for_signal().await;
    tracing::info!("shutting down");
    crate::notify::stopping();
    if matches!(discovery, Some(membership::Discovery::Store)) {
        // Leave at once: peers move this node's chunks to their next owners now.
        if let Err(e) = node.store.leave(&node.key).await {
            tracing::debug!(error = %e, "leaving the membership");
        }
    }
    attachments.detach_all().await;
    let _ = shutdown_tx.send(true);
    fill.stop_all();
    let _ = nbd.await;
    let _ = http.await;
    match fuse {
        // The next daemon takes it over: its users never see it go.
        Some(mount) if keep_across_restarts => mount.leave_for_restart(),
        Some(mount) => {
            let unmounted = tokio::task::spawn_blocking(move || mount.unmount()).await;
            if let Ok(Err(e)) = unmounted {
                tracing::warn!(error = %e, "FUSE unmount");
            }
        }
        None => {}
    }
    for sandbox in node.sandboxes.all() {
        if let Err(e) = sandbox.overlay.flush().await {
            tracing::error!(sandbox = sandbox.id(), error = %e, "flushing overlay at shutdown");
        }
    }
    if keep_across_restarts {
        // Exit here, not through the runtime's shutdown: that would drop the tasks of
        // FUSE requests still in flight, and fuser answers a dropped request with EIO.
        // Unanswered, they are asked for again by the next start (FUSE_NOTIFY_RESEND).
        tracing::info!("exiting; the next start takes over the FUSE mount");
        std::process::exit(0);
    }
    Ok(())
}

/// Binds the NBD listener at `addr` (or takes systemd's); a unix socket this start
/// made gets the mode and group of [`restrict_socket`].
async fn bind_nbd(
    keeper: &mut kept::Keeper,
    addr: &str,
    args: &DaemonArgs,
) -> anyhow::Result<lazyblk_nbd::Listener> {
    let (listener, bound) = keeper.nbd_listener(addr).await?;
    if let Some(path) = addr.strip_prefix("unix:").filter(|_| bound) {
        restrict_socket(std::path::Path::new(path), args.nbd_group.as_deref())?;
    }
    Ok(listener)
}

/// Refuses a fleet member that holds the store's read token but has no peer token: its
/// peer endpoints would fetch and serve the protected store's chunks to anyone.
fn check_peer_trust(args: &DaemonArgs) -> anyhow::Result<()> {
    let fleet = args.advertise.is_some() || args.peers.is_some();
    if fleet && args.read_token.is_some() && args.peer_token.is_none() {
        anyhow::bail!(
            "--read-token without --peer-token in a fleet (--advertise or --peers): this \
             daemon's peer endpoints would serve the protected store's chunks to anyone who \
             asks. Give every daemon of the fleet the same --peer-token (LAZYBLK_PEER_TOKEN), \
             or run without --advertise and --peers"
        );
    }
    let direct = crate::store::direct::is_object_url(&args.store);
    if fleet && direct && args.peer_token.is_none() {
        // Not refused: a bucket may be public. A private one's chunks go to anyone who
        // names a template and a digest of it.
        tracing::warn!(
            store = %args.store,
            "a fleet member reading an object store directly without --peer-token serves \
             its chunks to anyone who asks; give the fleet a --peer-token unless the bucket \
             is public"
        );
    }
    Ok(())
}

/// How often the daemon asks the store for templates it does not know yet.
const LEARN_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the node's list of templates in step with the store's.
async fn learn_templates(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        let learned = node.templates.learn_from_store().await;
        if learned > 0 {
            tracing::debug!(learned, "learned templates from the store");
        }
        tokio::select! {
            _ = tokio::time::sleep(LEARN_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Publishes each template's trace once it is complete: the first boot's, then the union
/// of the stored trace and what a later boot read that it misses (see
/// [`crate::daemon::trace`]).
async fn publish_traces(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRACE_PUBLISH_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        for replica in node.templates.all() {
            if !replica.trace.ready_to_publish() {
                continue;
            }
            let id = replica.id().to_string();
            let manifest = replica.manifest();
            let growth = replica.trace.growth();
            let stored = match node.store.trace(&id).await {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::debug!(template = %id, error = %e, "store unreachable for traces");
                    continue;
                }
            };
            // A stored trace this template refuses (other content) is replaced.
            let stored = stored.filter(|d| match d.check(&id, manifest) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(template = %id, error = %e, "stored trace refused; replacing it");
                    false
                }
            });
            let Some(doc) = replica.trace.document(manifest, stored.as_ref()) else {
                replica.trace.mark_published(growth, false);
                continue;
            };
            match node.store.put_trace(&id, &doc).await {
                Ok(()) => {
                    tracing::info!(template = %id, ranges = doc.ranges.len(), chunks = doc.chunks.len(),
                        union = stored.is_some(), "published boot trace");
                    replica.trace.mark_published(growth, true);
                }
                Err(e) => {
                    tracing::warn!(template = %id, error = %e, "publishing trace failed; will retry")
                }
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon runs until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Gives the NBD unix socket mode 0660 and, with `--nbd-group`, that group: only the
/// daemon's user and the group's members may connect (NBD itself has no credentials).
fn restrict_socket(path: &std::path::Path, group: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(group) = group {
        let gid = match group.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => {
                nix::unistd::Group::from_name(group)
                    .with_context(|| format!("looking up group {group:?}"))?
                    .with_context(|| format!("no group named {group:?} (--nbd-group)"))?
                    .gid
            }
        };
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Keeps glibc's heap from growing with the chunk buffers of past fetches: a buffer of
/// 1 MiB or more (a chunk's body or its decoded bytes) is its own mapping, returned when
/// freed, and the arenas are few; chunk buffers are reused through
/// `lazyblk_cache::buffers` instead. glibc's own threshold would rise to the largest
/// buffer freed and keep chunk-sized buffers in per-thread arenas (B7, the daemon's
/// peak RSS, was 139 MiB so). Smaller buffers (hyper's read buffers of about 400 KiB,
/// the NBD server's 256 KiB request buffers) come from the arenas and are reused: at a
/// threshold of 256 KiB each was a fresh mapping, and on B2's cold read the daemon
/// faulted in 290,000 pages (a quarter of its CPU); with the chunk buffers kept, 110,000
/// at 256 KiB and 33,000 at 1 MiB; the daemon's peak RSS on that read went from 91 to
/// 106 MiB (B7 in the bench: 102-106 MiB, under its 128 MiB).
fn bound_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
