//! Several store servers over one bucket (`lazyblk store --shared`, DESIGN section 10):
//! what each one does besides answering requests. Wishes, policy, tombstones and members
//! are documents changed by compare-and-swap ([`super::backend::DocChange`]); the node
//! leases, which change every heartbeat, are shared as one view per server
//! ([`super::nodes::LeaseView`]), written and read every [`HEARTBEAT`].
//!
//! Why views per server and not one document per node: a node renews every
//! [`HEARTBEAT`] (2 s), 43,200 times a day. One object per node written at each renewal
//! is 43.2 million PUTs a day for 1,000 nodes (about $216 a day at S3's $0.005 per
//! 1,000 PUTs), and GCS allows about one write per second per object. One view per
//! server is 43,200 PUTs a day per server whatever the fleet's size (two servers:
//! 86,400 PUTs, about $0.43 a day) plus the reads of the others' views (S servers:
//! S x (S - 1) x 43,200 GETs and S x 43,200 listings a day, at $0.0004 per 1,000 GETs).

use super::api::AppState;
use super::nodes::{LeaseView, HEARTBEAT, LEASES_DIR};

/// The longest replica name (it is part of an object key).
const MAX_NAME: usize = 64;

/// This server's name: `--replica-name`, or HOSTNAME-PORT.
pub fn name(given: Option<&str>, port: u16) -> anyhow::Result<String> {
    let name = match given {
        Some(n) => n.to_string(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "store".into());
            let host: String = host
                .trim()
                .chars()
                .map(|c| if allowed(c) { c } else { '-' })
                .take(MAX_NAME - 6)
                .collect();
            format!("{host}-{port}")
        }
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(allowed) {
        anyhow::bail!(
            "--replica-name {name:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
        );
    }
    Ok(name)
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Every [`HEARTBEAT`]: writes this server's lease view, reads the others', and deletes
/// views whose server is gone for good. Runs as long as the server.
pub async fn share_leases(state: AppState, name: String) {
    let own = format!("{LEASES_DIR}/{name}.json");
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = exchange(&state, &name, &own).await {
            // The leases this server holds still answer; the others' age out.
            tracing::warn!(error = %e, "sharing the node leases through the bucket");
        }
    }
}

async fn exchange(state: &AppState, name: &str, own: &str) -> anyhow::Result<()> {
    let backend = state.backend();
    let view = serde_json::to_vec(&state.nodes().view(name))?;
    backend.put_own_doc(own, view).await?;
    for (doc, _) in backend.list_docs(LEASES_DIR).await? {
        if doc == own {
            continue;
        }
        let Some(bytes) = backend.doc(&doc).await? else {
            state.nodes().forget_view(&doc);
            continue;
        };
        let view: LeaseView = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, view = %doc, "unreadable lease view; ignored");
                continue;
            }
        };
        if view.replica == name {
            tracing::error!(view = %doc, "another store server calls itself {name}: give each --replica-name of its own");
        }
        if state.nodes().absorb(&doc, view) {
            tracing::info!(view = %doc, "deleting the lease view of a store server gone for {} s", super::nodes::STALE_VIEW.as_secs());
            backend.delete_doc(&doc).await?;
            state.nodes().forget_view(&doc);
        }
    }
    // A member list written by whichever server sees a change first.
    state.persist_members().await?;
    Ok(())
}
