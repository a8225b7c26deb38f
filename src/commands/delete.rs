//! `lazyblk delete ID`: removes a template from the store (its chunks stay until
//! `lazyblk gc`).

use clap::Args;

use super::output::print_json;
use crate::flags::{TokenArg, DEFAULT_STORE};
use crate::store::client::StoreClient;

#[derive(Args, Debug, Clone)]
pub struct DeleteArgs {
    /// Template id to remove.
    pub template: String,
    /// URL of the artifact store.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    /// Delete even while live nodes report users of it (they keep serving the chunks
    /// they hold; gc spares the chunks while a live node uses them).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print JSON ({"template", "deleted"}).
    #[arg(long)]
    pub json: bool,
}

/// What `delete --json` prints.
#[derive(serde::Serialize)]
struct Deleted<'a> {
    template: &'a str,
    deleted: bool,
}

/// `lazyblk delete ID`.
pub async fn run(args: DeleteArgs) -> anyhow::Result<()> {
    let client = StoreClient::new(&args.store, args.token.resolve()?, None);
    client.delete(&args.template, args.force).await?;
    if args.json {
        return print_json(&Deleted {
            template: &args.template,
            deleted: true,
        });
    }
    println!(
        "deleted template {} (its chunks stay until `lazyblk gc`)",
        args.template
    );
    Ok(())
}
