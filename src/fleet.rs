//! The template center's commands (DESIGN section 10): wishes that steer where a
//! template is READY across the fleet (`warm ID --all-nodes | --nodes A,B |
//! --min-replicas K | --failed`, `unwarm ID`), one line per node for a template
//! (`status ID --fleet`), and the label policy that marks old templates STALE
//! (`policy set KEY '>=VERSION'`). All talk to the store server, which keeps the wishes
//! durably and the nodes' reports as soft state; nodes pull the wishes at their
//! heartbeats.

use anyhow::bail;
use serde_json::{json, Value};

use crate::cli::{PolicyCommand, StatusArgs, UnwarmArgs, WarmArgs};
use crate::printable::printable;

/// One request to the store server; the store's own message on an error. `store` may
/// name several servers over one bucket (`URL,URL`): one that cannot be reached or
/// answers 502, 503 or 504 is passed over for the next.
async fn call(
    store: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let servers: Vec<&str> = store
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut last = None;
    for (i, server) in servers.iter().enumerate() {
        let more = i + 1 < servers.len();
        match call_one(server, method.clone(), path, token, body.clone()).await {
            Ok(v) => return Ok(v),
            Err(Failure::Passable(e)) if more => {
                tracing::debug!(error = %e, "store server {server} passed over");
                last = Some(e);
            }
            Err(Failure::Passable(e)) | Err(Failure::Final(e)) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no store server given")))
}

/// Why one server's answer was not the answer.
enum Failure {
    /// Unreachable, or 502-504: another server may answer.
    Passable(anyhow::Error),
    /// The store's own refusal.
    Final(anyhow::Error),
}

async fn call_one(
    store: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let url = format!("{}{path}", store.trim_end_matches('/'));
    let mut request = crate::http_client::http_client().request(method, &url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| {
        Failure::Passable(anyhow::Error::new(e).context(format!(
            "store {store} unreachable (is `lazyblk store` running there?)"
        )))
    })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !status.is_success() {
        let message = value.get("error").and_then(Value::as_str).unwrap_or(&text);
        let e = anyhow::anyhow!("{}", printable(message));
        return Err(match status.as_u16() {
            502..=504 => Failure::Passable(e),
            _ => Failure::Final(e),
        });
    }
    Ok(value)
}

/// `lazyblk warm ID` with a fleet flag: records (or retries) a wish.
pub async fn warm(args: WarmArgs) -> anyhow::Result<()> {
    let Some(store) = &args.store else {
        bail!("the fleet flags need --store URL (the store server)");
    };
    let token = args.node.token.as_deref();
    let id = &args.template;
    if args.failed {
        let wish = call(
            store,
            reqwest::Method::POST,
            &format!("/v1/wishes/{id}/redo"),
            token,
            None,
        )
        .await?;
        println!(
            "{id}: nodes where it FAILED retry it at their next heartbeat (redo {})",
            wish["redo"]
        );
        return Ok(());
    }
    let placement = if args.all_nodes {
        json!("all_nodes")
    } else if let Some(k) = args.min_replicas {
        json!({ "min_replicas": k })
    } else {
        json!({ "nodes": args.nodes })
    };
    call(
        store,
        reqwest::Method::PUT,
        &format!("/v1/wishes/{id}"),
        token,
        Some(json!({ "placement": placement })),
    )
    .await?;
    println!("{id}: wish recorded ({placement}); nodes warm it at their next heartbeat");
    Ok(())
}

/// `lazyblk unwarm ID`: removes the wish.
pub async fn unwarm(args: UnwarmArgs) -> anyhow::Result<()> {
    let id = &args.template;
    let answer = call(
        &args.store,
        reqwest::Method::DELETE,
        &format!("/v1/wishes/{id}"),
        args.token.as_deref(),
        None,
    )
    .await?;
    if answer["removed"] == true {
        println!("{id}: wish removed; nodes unpin it at their next heartbeat");
    } else {
        println!("{id}: there was no wish for it");
    }
    Ok(())
}

/// `lazyblk status ID --fleet`: one line per live node.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (Some(store), Some(id)) = (&args.store, &args.template) else {
        bail!("status --fleet needs a template id and --store URL");
    };
    let lines = call(
        store,
        reqwest::Method::GET,
        &format!("/v1/fleet/{id}"),
        None,
        None,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
        return Ok(());
    }
    let lines = lines.as_array().cloned().unwrap_or_default();
    if lines.is_empty() {
        println!("no live nodes (daemons with --advertise register with their store)");
        return Ok(());
    }
    println!(
        "{:<32} {:<28} {:<13} {:>13} {:<7} ERROR",
        "NODE", "ADDRESS", "PHASE", "LOCAL", "WANTED"
    );
    // Every string here comes from a node's lease: shown without control characters.
    let text = |l: &Value, key: &str| printable(l[key].as_str().unwrap_or("")).into_owned();
    for l in lines {
        let local = l["local_chunks"].as_u64().unwrap_or(0);
        let total = l["stored_chunks"].as_u64().unwrap_or(0);
        let pct = (local * 100).checked_div(total).unwrap_or(0);
        println!(
            "{:<32} {:<28} {:<13} {:>13} {:<7} {}",
            text(&l, "node"),
            text(&l, "url"),
            text(&l, "phase"),
            format!("{local}/{total} ({pct}%)"),
            if l["wanted"] == true { "yes" } else { "-" },
            printable(l["last_error"].as_str().unwrap_or("-")),
        );
    }
    Ok(())
}

/// `lazyblk policy set|unset|list`.
pub async fn policy(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Set(a) => {
            let p = call(
                &a.store,
                reqwest::Method::PUT,
                &format!("/v1/policy/{}", path_segment(&a.key)),
                a.token.as_deref(),
                Some(json!({ "minimum": a.minimum })),
            )
            .await?;
            println!("policy: {}", printable(&serde_json::to_string(&p)?));
        }
        PolicyCommand::Unset(a) => {
            let p = call(
                &a.store,
                reqwest::Method::PUT,
                &format!("/v1/policy/{}", path_segment(&a.key)),
                a.token.as_deref(),
                Some(json!({ "minimum": null })),
            )
            .await?;
            println!("policy: {}", printable(&serde_json::to_string(&p)?));
        }
        PolicyCommand::List(a) => {
            let p = call(&a.store, reqwest::Method::GET, "/v1/policy", None, None).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else if let Some(map) = p.as_object() {
                if map.is_empty() {
                    println!("no policy: no template is STALE");
                }
                for (k, v) in map {
                    println!("{} {}", printable(k), printable(v.as_str().unwrap_or("")));
                }
            }
        }
    }
    Ok(())
}

/// `s` as one path segment: every byte but the URL's unreserved characters
/// percent-encoded (a label key holds `/`; one from before the grammar may hold more).
fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_path_segment() {
        assert_eq!(path_segment("guest_agent"), "guest_agent");
        assert_eq!(path_segment("app.k8s.io/name"), "app.k8s.io%2Fname");
        assert_eq!(path_segment("a b\n"), "a%20b%0A");
    }
}
