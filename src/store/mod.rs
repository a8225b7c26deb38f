//! The artifact store: manifests, chunks and traces in a directory or an S3-compatible
//! bucket, served over HTTP.
//!
//! # Layout
//! - [`backend`]: the two engines behind one enum: a directory (`manifests/`,
//!   `chunks/<2 hex>/<64 hex>`, `traces/`, `tmp/`) with crash-safe writes and gc, and
//!   object storage with the same keys under a bucket prefix; durability.
//! - [`api`]: the axum routes, bearer tokens and the store's counters.
//! - [`client`]: [`client::StoreClient`], used by publish and the daemon, and the
//!   `templates`, `delete`, `gc` and `nodes` commands.
//! - [`direct`]: the client's operations straight on object storage (no store server).
//! - [`center`]: the template center: replicas over the fleet, wishes (desired
//!   state), the label policy.
//! - [`nodes`]: the fleet's membership, node leases kept as soft state.
//! - `replica`: several store servers over one bucket (`--shared`): sharing the leases.
//! - [`args`]: `lazyblk store`'s flags.
//! - This file: [`run`] and the JSON documents the server and the client share.
//!
//! # Data flow
//! A request enters [`api`], passes the token check, and reaches [`backend`]. The
//! directory writes through `tmp/` (write, fsync, rename, fsync the directory) so a
//! crash leaves either the old state or the new one, never a torn file; object storage
//! gets one PUT per object, after the body was verified.

pub mod admission;
pub mod api;
pub mod args;
pub mod backend;
pub mod center;
pub mod center_wire;
pub mod client;
pub mod direct;
pub mod error;
pub mod nodes;
mod replica;
pub mod trace;

pub use trace::{TraceDoc, MAX_TRACE_RANGES, TRACE_VERSION};

use std::sync::Arc;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::args::StoreArgs;

/// How durable a template is in the store (DESIGN.md section 6), derived from which of
/// its chunks are on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Durability {
    /// None of the template's own chunks (those its parent does not have) are stored:
    /// only its origin node holds them.
    OriginOnly,
    /// Some of them are stored.
    Uploading,
    /// Every non-zero chunk is stored.
    Durable,
}

impl Durability {
    /// A template just committed with `new_chunks` chunks only its origin holds.
    pub fn after_commit(new_chunks: usize) -> Durability {
        if new_chunks == 0 {
            Durability::Durable
        } else {
            Durability::OriginOnly
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Durability::OriginOnly => "ORIGIN_ONLY",
            Durability::Uploading => "UPLOADING",
            Durability::Durable => "DURABLE",
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of `GET /v1/templates` (and the answer of `GET /v1/templates/{id}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSummary {
    pub template: String,
    /// Bytes.
    pub size: u64,
    pub chunk_size: u32,
    /// Number of chunks, zero chunks included.
    pub chunks: usize,
    /// Number of non-zero chunks (the ones that are stored at all).
    pub stored_chunks: usize,
    /// Bytes of the non-zero chunks.
    pub stored_bytes: u64,
    /// How many of the non-zero chunks the store holds now.
    #[serde(default)]
    pub present_chunks: usize,
    #[serde(default)]
    pub parent: Option<String>,
    /// The template's replicas over the fleet's live nodes (the template center).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<center::ReplicaCounts>,
    /// Below the store's label policy (`policy set`): what upgrade tooling rebuilds.
    #[serde(default)]
    pub stale: bool,
    /// Why it is STALE (the label and the minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_because: Option<String>,
    /// The manifest's labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub created_at: String,
    pub durability: Durability,
}

/// The answer of `POST /v1/gc`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Unreferenced chunks removed.
    pub chunks_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Chunks some manifest references.
    pub chunks_referenced: u64,
    /// Unreferenced chunks kept because they were written or confirmed within the grace
    /// period (a publish in progress uploads chunks before its manifest).
    pub chunks_recent: u64,
}

/// The descriptor limit the store asks for: its HTTP connections (a fleet's keep-alive
/// pools) and the files of the chunks it reads and writes.
const WANTED_NOFILE: u64 = 65536;

/// Runs the store until SIGINT or SIGTERM.
pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    crate::http_server::raise_descriptor_limit(WANTED_NOFILE);
    let (backend, location) = open_backend(&args).await?;
    if args.shared {
        if let backend::Backend::Object(o) = &backend {
            o.use_conditional_writes();
        }
        backend.probe_conditional_writes().await.with_context(|| {
            format!("--shared: checking that {location} honours conditional writes")
        })?;
        tracing::info!(store = %location, "the backend honours conditional writes; sharing it with other store servers");
    }
    let backend = Arc::new(backend);
    let center = center::Center::load(backend.clone())
        .await
        .with_context(|| format!("loading the template center's wishes from {location}"))?;
    let limits = args.http.limits();
    let members = backend
        .doc(nodes::MEMBERS_DOC)
        .await
        .with_context(|| format!("loading the members the store knew from {location}"))?;
    let membership = nodes::Membership::new(args.max_members, members.as_deref());
    if let Some((waiting, _)) = membership.unsettled() {
        tracing::info!(
            nodes = waiting.len(),
            "deletes and gc wait until the nodes this store knew renew their leases (at most {} s)",
            nodes::SETTLE.as_secs()
        );
    }
    let admission = admission::Admission::new(args.member_keys.clone(), &args.member_networks)
        .map_err(anyhow::Error::msg)?;
    let tokens = api::Tokens::new(
        args.write_token,
        args.read_token,
        args.member_token,
        args.admin_token,
    );
    let mut state = api::AppState::new(backend, Arc::new(center), membership, admission, tokens);
    let trusted_keys = match &args.trusted_keys {
        Some(path) => Some(crate::trust::TrustedKeys::open(path)?),
        None => None,
    };
    crate::trust::reload_on_sighup(trusted_keys.clone())
        .context("listening for SIGHUP (to read --trusted-keys again)")?;
    if let Some(keys) = trusted_keys {
        state = state.with_trusted_keys(keys);
    }
    // Nodes whose lease ran out are struck from the member list.
    let persisting = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(nodes::HEARTBEAT).await;
            if let Err(e) = persisting.persist_members().await {
                tracing::warn!(error = %e, "saving the member list");
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener
        .local_addr()
        .with_context(|| format!("listening on {}", args.listen))?;
    if args.shared {
        let name = replica::name(args.replica_name.as_deref(), local.port())?;
        tracing::info!(replica = %name, "sharing node leases through center/leases/");
        tokio::spawn(replica::share_leases(state.clone(), name));
    }
    tracing::info!(store = %location, address = %local, "store listening");
    crate::notify::ready(&format!("serving {location} on {local}"));
    crate::http_server::serve(listener, api::router(state), limits, shutdown_signal())
        .await
        .with_context(|| format!("serving on {local}"))?;
    tracing::info!("store stopped");
    Ok(())
}

/// The engine `--backend` (object storage) or `--root` (a directory) names, and where
/// it keeps its data, for the log.
async fn open_backend(args: &StoreArgs) -> anyhow::Result<(backend::Backend, String)> {
    match &args.backend {
        Some(url) => {
            // Its errors name the URL already.
            let engine = backend::ObjectBackend::open(url)?;
            Ok((backend::Backend::Object(engine), url.clone()))
        }
        None => {
            let engine = backend::DirBackend::open(&args.root)
                .await
                .with_context(|| format!("cannot open the store at {}", args.root.display()))?;
            Ok((
                backend::Backend::Dir(engine),
                args.root.display().to_string(),
            ))
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    crate::notify::stopping();
}
