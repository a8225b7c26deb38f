//! The commands that talk to a node daemon over its HTTP API: `status`, `warm`,
//! `evict`, `overlay`, `commit`, `attach` and `detach`.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::cli::{
    AttachArgs, CommitArgs, DetachArgs, EvictArgs, NodeArg, OverlayCommand, ResizeArgs, StatusArgs,
    WarmArgs,
};
use crate::daemon::state::Phase;
use crate::printable::printable;
use crate::progress::Progress;
use crate::store::Durability;

/// How often `warm --wait` polls the daemon.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// A client of one daemon's HTTP API.
struct NodeClient {
    base: String,
    http: reqwest::Client,
    /// Sent as a bearer token (the daemon checks it on changing requests).
    token: Option<String>,
}

impl NodeClient {
    fn new(node: &NodeArg) -> NodeClient {
        NodeClient {
            base: node.node.trim_end_matches('/').to_string(),
            http: crate::http_client::http_client(),
            token: node.token.clone(),
        }
    }

    /// Sends a request and returns the JSON answer, or an error carrying the daemon's
    /// own message.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| {
            format!(
                "daemon at {} unreachable (is `lazyblk daemon` running? pass --node URL)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(text);
            bail!("{}", printable(&message));
        }
        Ok(value)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }
}

/// `lazyblk status [ID]`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    if args.devices {
        let devices = node.get("/v1/attachments").await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&devices)?);
        } else {
            let devices = devices.as_array().cloned().unwrap_or_default();
            if devices.is_empty() {
                println!("no kernel block devices attached by this node");
            } else {
                print!("{}", devices_table(&devices));
            }
        }
        return Ok(());
    }
    let replicas = match &args.template {
        Some(id) => vec![node.get(&format!("/v1/templates/{id}")).await?],
        None => node
            .get("/v1/templates")
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default(),
    };
    if args.json {
        let out = match &args.template {
            Some(_) => replicas.into_iter().next().unwrap_or(Value::Null),
            None => Value::Array(replicas),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if args.template.is_some() {
        print!("{}", describe(&replicas[0]));
        return Ok(());
    }
    if replicas.is_empty() {
        println!("no templates on this node yet (they appear when first opened or warmed)");
    } else {
        print!("{}", table(&replicas));
    }
    let devices = node.get("/v1/attachments").await?;
    let devices = devices.as_array().cloned().unwrap_or_default();
    if !devices.is_empty() {
        print!("\n{}", devices_table(&devices));
    }
    Ok(())
}

/// A replica's phase in a daemon's answer. A name this client does not know (a newer
/// daemon's) is an error that quotes it.
fn phase(v: &Value) -> anyhow::Result<Phase> {
    Phase::deserialize(v.get("phase").unwrap_or(&Value::Null)).with_context(|| {
        format!(
            "the daemon reported a phase this lazyblk does not know: {}",
            printable(&v.get("phase").map(Value::to_string).unwrap_or_default())
        )
    })
}

/// A template's durability in a daemon's answer (`None`: the daemon did not commit it).
fn durability(v: &Value) -> anyhow::Result<Option<Durability>> {
    Option::<Durability>::deserialize(v.get("durability").unwrap_or(&Value::Null)).with_context(
        || {
            format!(
                "the daemon reported a durability this lazyblk does not know: {}",
                printable(
                    &v.get("durability")
                        .map(Value::to_string)
                        .unwrap_or_default()
                )
            )
        },
    )
}

/// The durability of a template a commit just made (a commit's answer always has it).
fn committed_durability(v: &Value) -> anyhow::Result<Durability> {
    durability(v)?.context("the daemon's commit answer has no durability")
}

/// A phase or durability as shown in a listing: the typed name, or what the daemon
/// sent (printable) when this client does not know it.
fn shown<T: std::fmt::Display>(typed: anyhow::Result<T>, v: &Value, key: &str) -> String {
    typed.map_or_else(|_| s(v, key).into_owned(), |t| t.to_string())
}

/// The kernel block devices, one line each; a device not connected says why.
fn devices_table(devices: &[Value]) -> String {
    let mut rows = vec![[
        "DEVICE".to_string(),
        "EXPORT".into(),
        "KIND".into(),
        "CONNECTIONS".into(),
        "STATE".into(),
        "ATTACHED".into(),
    ]];
    let mut notes = Vec::new();
    for d in devices {
        rows.push([
            s(d, "device").to_string(),
            s(d, "export").to_string(),
            s(d, "kind").to_string(),
            format!("{} ({})", u(d, "connections"), s(d, "link")),
            s(d, "state").to_string(),
            s(d, "attached_at").to_string(),
        ]);
        if let Some(error) = d.get("error").and_then(Value::as_str) {
            notes.push(format!("{}: {}", s(d, "device"), printable(error)));
        }
    }
    let mut out = aligned(&rows);
    for note in notes {
        out.push_str(&format!("  {note}\n"));
    }
    out
}

/// Rows of six cells in aligned columns.
fn aligned(rows: &[[String; 6]]) -> String {
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// A string field of a daemon's answer, as shown: without control characters (an error
/// message or a user's name may quote what a client or a peer sent).
fn s<'a>(v: &'a Value, key: &str) -> std::borrow::Cow<'a, str> {
    printable(v.get(key).and_then(Value::as_str).unwrap_or(""))
}

/// The strings of an array field, as shown (see [`s`]).
fn strings<'a>(v: &'a Value, key: &str) -> Vec<std::borrow::Cow<'a, str>> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(printable).collect())
        .unwrap_or_default()
}

/// Bytes in binary units, as an operator reads them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn percent(local: u64, total: u64) -> String {
    match (local * 100).checked_div(total) {
        Some(p) => format!("{p}%"),
        None => "100%".into(),
    }
}

fn by_source(v: &Value) -> String {
    let Some(map) = v.get("bytes_by_source").and_then(Value::as_object) else {
        return "-".into();
    };
    if map.is_empty() {
        return "-".into();
    }
    map.iter()
        .map(|(source, bytes)| {
            format!(
                "{} from {}",
                human_bytes(bytes.as_u64().unwrap_or(0)),
                printable(source)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(replicas: &[Value]) -> String {
    let mut rows = vec![[
        "TEMPLATE".to_string(),
        "PHASE".into(),
        "LOCAL".into(),
        "SIZE".into(),
        "FETCHED".into(),
        "USERS".into(),
    ]];
    for r in replicas {
        let (local, total) = (u(r, "local_chunks"), u(r, "stored_chunks"));
        rows.push([
            s(r, "template").to_string(),
            shown(phase(r), r, "phase"),
            format!("{local}/{total} ({})", percent(local, total)),
            human_bytes(u(r, "size")),
            by_source(r),
            r.get("users")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
                .to_string(),
        ]);
    }
    aligned(&rows)
}

fn describe(r: &Value) -> String {
    let (local, total) = (u(r, "local_chunks"), u(r, "stored_chunks"));
    let mut out = format!(
        "template:   {}\nphase:      {}\nsize:       {} ({} chunks of {}, {} zero)\nlocal:      {local}/{total} chunks ({})\nfetched:    {}\n",
        s(r, "template"),
        shown(phase(r), r, "phase"),
        human_bytes(u(r, "size")),
        u(r, "chunks"),
        human_bytes(u(r, "chunk_size")),
        u(r, "chunks").saturating_sub(total),
        percent(local, total),
        by_source(r),
    );
    if let Some(parent) = r.get("parent").and_then(Value::as_str) {
        out.push_str(&format!("parent:     {}\n", printable(parent)));
    }
    if r.get("durability").is_some_and(|d| !d.is_null()) {
        let durability = match durability(r) {
            Ok(Some(d)) => d.to_string(),
            _ => s(r, "durability").into_owned(),
        };
        let pending = u(r, "pending_upload_chunks");
        let detail = if pending > 0 {
            format!(" ({pending} chunks to upload)")
        } else {
            String::new()
        };
        out.push_str(&format!("durability: {durability}{detail}\n"));
    }
    let origins = strings(r, "origins");
    if !origins.is_empty() {
        out.push_str(&format!("origins:    {}\n", origins.join(", ")));
    }
    if u(r, "corrupt_chunks") > 0 {
        out.push_str(&format!(
            "corrupt:    {} chunks refused (digest mismatch)\n",
            u(r, "corrupt_chunks")
        ));
    }
    if let Some(e) = r.get("last_error").and_then(Value::as_str) {
        let e = printable(e);
        let at = s(r, "last_error_at");
        out.push_str(&format!(
            "last error: {e} {}\n",
            if at.is_empty() {
                String::new()
            } else {
                format!("(at {at})")
            }
        ));
    }
    let users = strings(r, "users");
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

/// `lazyblk warm ID [--wait] [--redo]`.
pub async fn warm(args: WarmArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let path = format!("/v1/templates/{}", args.template);
    let query = if args.redo { "?redo=true" } else { "" };
    let started = node.post(&format!("{path}/warm{query}"), None).await?;
    if !args.wait {
        println!("{}: {}", args.template, phase(&started)?);
        return Ok(());
    }
    let total = u(&started, "stored_bytes");
    let progress = Progress::new(&format!("warming {}", args.template), total);
    loop {
        let r = node.get(&path).await?;
        progress.set(u(&r, "local_bytes"));
        match phase(&r)? {
            Phase::Ready => {
                progress.finish(&format!(
                    "{} READY ({} chunks local)",
                    args.template,
                    u(&r, "local_chunks")
                ));
                return Ok(());
            }
            Phase::Failed => {
                progress.finish(&format!("{} FAILED", args.template));
                bail!(
                    "fill of {} FAILED: {} (reads are still served lazily; retry with `lazyblk warm {} --redo`)",
                    args.template,
                    s(&r, "last_error"),
                    args.template
                );
            }
            stopped @ (Phase::Pending | Phase::Cleaning) => {
                bail!("fill of {} stopped (phase {stopped})", args.template)
            }
            Phase::Distributing => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// `lazyblk evict ID [--force]`.
pub async fn evict(args: EvictArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let query = if args.force { "?force=true" } else { "" };
    let r = node
        .post(
            &format!("/v1/templates/{}/evict{query}", args.template),
            None,
        )
        .await?;
    println!(
        "evicted {}: {} chunks removed",
        args.template,
        u(&r, "removed_chunks")
    );
    Ok(())
}

/// `lazyblk overlay create|delete|list`.
pub async fn overlay(command: OverlayCommand) -> anyhow::Result<()> {
    match command {
        OverlayCommand::Create {
            template,
            sandbox,
            node,
        } => {
            let node = NodeClient::new(&node);
            let r = node
                .post(
                    "/v1/overlays",
                    Some(serde_json::json!({ "template": template, "sandbox": sandbox })),
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        OverlayCommand::Delete {
            sandbox,
            node,
            force,
        } => {
            let node = NodeClient::new(&node);
            let query = if force { "?force=true" } else { "" };
            node.call(
                reqwest::Method::DELETE,
                &format!("/v1/overlays/{sandbox}{query}"),
                None,
            )
            .await?;
            println!("deleted overlay {sandbox}");
        }
        OverlayCommand::List { node, json } => {
            let node = NodeClient::new(&node);
            let r = node.get("/v1/overlays").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{:<24} {:<24} {:>10}  USERS",
                    "SANDBOX", "TEMPLATE", "WRITTEN"
                );
                for o in r.as_array().cloned().unwrap_or_default() {
                    // A commit under way says so: the sandbox cannot be deleted or
                    // committed again until it returns.
                    let committing = match o.get("committing").and_then(Value::as_str) {
                        Some(t) => format!("  (committing as {})", printable(t)),
                        None => String::new(),
                    };
                    println!(
                        "{:<24} {:<24} {:>10}  {}{committing}",
                        s(&o, "sandbox"),
                        s(&o, "template"),
                        human_bytes(u(&o, "written_bytes")),
                        o.get("users").and_then(Value::as_array).map_or(0, Vec::len)
                    );
                }
            }
        }
    }
    Ok(())
}

/// `lazyblk commit SB --template NEWID`.
pub async fn commit(args: CommitArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let r = node
        .post(
            &format!("/v1/overlays/{}/commit", args.sandbox),
            Some(serde_json::json!({
                "template": args.template,
                "labels": args.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            })),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "committed {} as {}: {} new chunks, {} shared with {}; durability {}",
            args.sandbox,
            args.template,
            u(&r, "new_chunks"),
            u(&r, "shared_chunks"),
            s(&r, "parent"),
            shown(committed_durability(&r), &r, "durability")
        );
    }
    Ok(())
}

/// `lazyblk attach EXPORT [--device /dev/nbdN]`: prints the device path.
pub async fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let r = node
        .post(
            "/v1/attachments",
            Some(serde_json::json!({
                "export": args.export,
                "device": args.device,
                "connections": args.connections,
                "kind": args.kind.name(),
            })),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", s(&r, "device"));
    }
    Ok(())
}

/// `lazyblk detach /dev/nbdN [--force]`.
pub async fn detach(args: DetachArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let name = args.device.trim_start_matches("/dev/");
    if name.is_empty() || name.contains('/') {
        bail!(
            "{:?} is not a kernel block device (expected /dev/nbdN or /dev/ublkbN)",
            args.device
        );
    }
    let query = if args.force { "?force=true" } else { "" };
    let r = node
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/attachments/{name}{query}"),
            None,
        )
        .await?;
    println!("detached {} (export {})", s(&r, "device"), s(&r, "export"));
    Ok(())
}

/// `lazyblk resize ID --size SIZE --template NEWID`.
pub async fn resize(args: ResizeArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node);
    let r = node
        .post(
            &format!("/v1/templates/{}/resize", args.template),
            Some(serde_json::json!({
                "size": args.size,
                "template": args.new_template,
                "labels": args.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            })),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "resized {} ({}) into {} ({}): {} new chunks, {} shared; durability {}",
            args.template,
            human_bytes(u(&r, "old_size")),
            args.new_template,
            human_bytes(u(&r, "new_size")),
            u(&r["commit"], "new_chunks"),
            u(&r["commit"], "shared_chunks"),
            shown(
                committed_durability(&r["commit"]),
                &r["commit"],
                "durability"
            )
        );
    }
    Ok(())
}

/// `lazyblk scrub`: on a node, starts its scrub and follows it with a progress bar; on
/// a store, waits for the store's scrub. Prints what was dropped.
pub async fn scrub(args: crate::cli::ScrubArgs) -> anyhow::Result<()> {
    let report = match &args.store {
        Some(url) => {
            let client = crate::store::client::StoreClient::new(url, args.token.clone(), None);
            let report = client
                .scrub()
                .await
                .with_context(|| format!("scrub of store {url}"))?;
            serde_json::to_value(report)?
        }
        None => {
            let node = NodeClient::new(&NodeArg {
                node: args.node.clone(),
                token: args.token.clone(),
            });
            let started = node.post("/v1/scrub", None).await?;
            let bar = crate::progress::Progress::new("scrub", u(&started, "total").max(1));
            loop {
                let p = node.get("/v1/scrub").await?;
                bar.set(u(&p, "done"));
                if !p.get("running").and_then(Value::as_bool).unwrap_or(false) {
                    bar.finish("done");
                    break p.get("report").cloned().unwrap_or(Value::Null);
                }
                tokio::time::sleep(WAIT_POLL).await;
            }
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let dropped = report
        .get("dropped")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let unreadable = report
        .get("unreadable")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    println!(
        "scrub: checked {} chunks ({}), dropped {} corrupt, {} unreadable",
        u(&report, "checked"),
        human_bytes(u(&report, "bytes")),
        dropped.len(),
        unreadable.len()
    );
    for d in dropped {
        println!("dropped {}", printable(d.as_str().unwrap_or("")));
    }
    for d in unreadable {
        println!("unreadable {}", printable(d.as_str().unwrap_or("")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_durabilities_parse_typed_and_unknown_names_are_named() {
        for (name, want) in [
            ("PENDING", Phase::Pending),
            ("DISTRIBUTING", Phase::Distributing),
            ("READY", Phase::Ready),
            ("FAILED", Phase::Failed),
            ("CLEANING", Phase::Cleaning),
        ] {
            let r = serde_json::json!({ "phase": name });
            assert_eq!(phase(&r).unwrap(), want);
            assert_eq!(want.to_string(), name, "the same name on the wire");
        }
        let err = phase(&serde_json::json!({ "phase": "MIGRATING" })).unwrap_err();
        assert!(format!("{err:#}").contains("MIGRATING"), "{err:#}");
        assert!(phase(&serde_json::json!({})).is_err());

        assert_eq!(durability(&serde_json::json!({})).unwrap(), None);
        assert_eq!(
            durability(&serde_json::json!({ "durability": null })).unwrap(),
            None
        );
        assert_eq!(
            durability(&serde_json::json!({ "durability": "ORIGIN_ONLY" })).unwrap(),
            Some(Durability::OriginOnly)
        );
        let odd = serde_json::json!({ "durability": "LOST" });
        assert!(durability(&odd).is_err());
        assert_eq!(
            shown(committed_durability(&odd), &odd, "durability"),
            "LOST"
        );
        assert!(committed_durability(&serde_json::json!({})).is_err());
    }
}
