//! `lazyblk status ID --fleet --store URL`: one line per live node for a template, from
//! the store's template center (DESIGN section 10).

use anyhow::bail;

use super::output::{aligned, print_json};
use crate::printable::printable;
use crate::store::client::StoreClient;

/// `lazyblk status ID --fleet --store URL` (`status` hands over its template, store
/// and `--json`).
pub async fn run(template: Option<&str>, store: Option<&str>, json: bool) -> anyhow::Result<()> {
    let (Some(store), Some(id)) = (store, template) else {
        bail!("status --fleet needs a template id and --store URL");
    };
    let lines = StoreClient::new(store, None, None).fleet(id).await?;
    if json {
        return print_json(&lines);
    }
    if lines.is_empty() {
        println!("no live nodes (daemons with --advertise register with their store)");
        return Ok(());
    }
    let mut rows = vec![["NODE", "ADDRESS", "PHASE", "LOCAL", "WANTED", "ERROR"].map(String::from)];
    // Every string here comes from a node's lease: shown without control characters.
    for l in lines {
        let pct = (l.local_chunks * 100)
            .checked_div(l.stored_chunks)
            .unwrap_or(0);
        rows.push([
            printable(&l.node).into_owned(),
            printable(&l.url).into_owned(),
            printable(&l.phase).into_owned(),
            format!("{}/{} ({pct}%)", l.local_chunks, l.stored_chunks),
            if l.wanted { "yes" } else { "-" }.to_string(),
            printable(l.last_error.as_deref().unwrap_or("-")).into_owned(),
        ]);
    }
    print!("{}", aligned(&rows));
    Ok(())
}
