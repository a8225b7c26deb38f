//! `lazyblk status [ID] [--devices]`: a node's replicas (phase, progress, bytes by
//! source, users) and its kernel block devices. With `--fleet`, see [`super::status_fleet`].

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::{aligned, human_bytes, percent, print_json};
use crate::daemon::api::ReplicaStatus;
use crate::daemon::attach::AttachmentStatus;
use crate::printable::printable;

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// A template id; all replicas when omitted.
    pub template: Option<String>,
    #[command(flatten)]
    pub node: NodeArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Only the kernel block devices (/dev/nbdN): export, kind, connections and state
    /// (connected, waiting for reconfigure, dead); with --json, the daemon's
    /// /v1/attachments.
    #[arg(long, conflicts_with_all = ["template", "fleet"])]
    pub devices: bool,
    /// One line per live node of the fleet for the template (needs --store).
    #[arg(long, requires = "template", requires = "store")]
    pub fleet: bool,
    /// The store server whose fleet to show (with --fleet).
    #[arg(long)]
    pub store: Option<String>,
}

/// `lazyblk status [ID]`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    if args.fleet {
        return super::status_fleet::run(
            args.template.as_deref(),
            args.store.as_deref(),
            args.json,
        )
        .await;
    }
    let node = NodeClient::new(&args.node)?;
    if args.devices {
        let devices = node.attachments().await?;
        if args.json {
            return print_json(&devices);
        }
        if devices.is_empty() {
            println!("no kernel block devices attached by this node");
        } else {
            print!("{}", devices_table(&devices));
        }
        return Ok(());
    }
    if let Some(id) = &args.template {
        let replica = node.replica(id).await?;
        if args.json {
            return print_json(&replica);
        }
        print!("{}", describe(&replica));
        return Ok(());
    }
    let replicas = node.replicas().await?;
    if args.json {
        return print_json(&replicas);
    }
    if replicas.is_empty() {
        println!("no templates on this node yet (they appear when first opened or warmed)");
    } else {
        print!("{}", table(&replicas));
    }
    let devices = node.attachments().await?;
    if !devices.is_empty() {
        print!("\n{}", devices_table(&devices));
    }
    Ok(())
}

/// The kernel block devices, one line each; a device not connected says why.
pub fn devices_table(devices: &[AttachmentStatus]) -> String {
    let mut rows = vec![[
        "DEVICE",
        "EXPORT",
        "KIND",
        "CONNECTIONS",
        "STATE",
        "ATTACHED",
    ]
    .map(String::from)];
    let mut notes = Vec::new();
    for d in devices {
        rows.push([
            printable(&d.device).into_owned(),
            printable(&d.export).into_owned(),
            d.kind.to_string(),
            format!("{} ({})", d.connections, d.link),
            serde_json::to_value(d.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            printable(&d.attached_at).into_owned(),
        ]);
        if let Some(error) = &d.error {
            notes.push(format!("{}: {}", printable(&d.device), printable(error)));
        }
    }
    let mut out = aligned(&rows);
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    out
}

/// Bytes by source, e.g. `1.0 MiB from store, 2.0 MiB from peer`.
fn by_source(r: &ReplicaStatus) -> String {
    if r.bytes_by_source.is_empty() {
        return "-".into();
    }
    r.bytes_by_source
        .iter()
        .map(|(source, bytes)| format!("{} from {}", human_bytes(*bytes), printable(source)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// All replicas, one line each.
fn table(replicas: &[ReplicaStatus]) -> String {
    let mut rows =
        vec![["TEMPLATE", "PHASE", "LOCAL", "SIZE", "FETCHED", "USERS"].map(String::from)];
    for r in replicas {
        let (local, total) = (r.local_chunks, r.stored_chunks);
        rows.push([
            printable(&r.template).into_owned(),
            r.phase.to_string(),
            format!("{local}/{total} ({})", percent(local, total)),
            human_bytes(r.size),
            by_source(r),
            r.users.len().to_string(),
        ]);
    }
    aligned(&rows)
}

/// One replica, a field a line.
fn describe(r: &ReplicaStatus) -> String {
    let (local, total) = (r.local_chunks, r.stored_chunks);
    let mut out = format!(
        "template:   {}\nphase:      {}\nsize:       {} ({} chunks of {}, {} zero)\nlocal:      {local}/{total} chunks ({})\nfetched:    {}\n",
        printable(&r.template),
        r.phase,
        human_bytes(r.size),
        r.chunks,
        human_bytes(u64::from(r.chunk_size)),
        r.chunks.saturating_sub(total),
        percent(local, total),
        by_source(r),
    );
    if let Some(parent) = &r.parent {
        out.push_str(&format!("parent:     {}\n", printable(parent)));
    }
    if let Some(durability) = r.durability {
        let detail = match r.pending_upload_chunks {
            Some(pending) if pending > 0 => format!(" ({pending} chunks to upload)"),
            _ => String::new(),
        };
        out.push_str(&format!("durability: {durability}{detail}\n"));
    }
    if !r.origins.is_empty() {
        let origins: Vec<_> = r.origins.iter().map(|o| printable(o)).collect();
        out.push_str(&format!("origins:    {}\n", origins.join(", ")));
    }
    if r.corrupt_chunks > 0 {
        out.push_str(&format!(
            "corrupt:    {} chunks refused (digest mismatch)\n",
            r.corrupt_chunks
        ));
    }
    if let Some(e) = &r.last_error {
        let at = match &r.last_error_at {
            Some(at) if !at.is_empty() => format!("(at {})", printable(at)),
            _ => String::new(),
        };
        out.push_str(&format!("last error: {} {at}\n", printable(e)));
    }
    let users: Vec<_> = r.users.iter().map(|u| printable(u)).collect();
    out.push_str(&format!(
        "in use by:  {}\n",
        if users.is_empty() {
            "nobody".to_string()
        } else {
            users.join(", ")
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phase this client does not know (a newer daemon's) fails the parse, naming it.
    #[test]
    fn an_unknown_phase_is_named() {
        let mut answer = serde_json::json!({
            "template": "t", "phase": "READY", "durability": null,
            "pending_upload_chunks": null, "last_error_at": null, "size": 4096,
            "chunk_size": 4096, "chunks": 1, "stored_chunks": 1, "local_chunks": 1,
            "stored_bytes": 4096, "local_bytes": 4096, "bytes_by_source": {},
            "corrupt_chunks": 0, "last_error": null, "users": [], "origins": [],
            "parent": null
        });
        let r: ReplicaStatus = serde_json::from_value(answer.clone()).unwrap();
        assert!(
            describe(&r).contains("phase:      READY"),
            "{}",
            describe(&r)
        );
        answer["phase"] = "MIGRATING".into();
        let err = serde_json::from_value::<ReplicaStatus>(answer)
            .err()
            .unwrap();
        assert!(err.to_string().contains("MIGRATING"), "{err}");
    }
}
