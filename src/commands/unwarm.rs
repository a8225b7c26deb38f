//! `lazyblk unwarm ID`: removes the template's fleet wish; nodes unpin it at their
//! next heartbeat.

use clap::Args;

use super::output::print_json;
use crate::flags::{TokenArg, DEFAULT_STORE};
use crate::store::client::StoreClient;

#[derive(Args, Debug, Clone)]
pub struct UnwarmArgs {
    pub template: String,
    /// The store server holding the fleet's desired state.
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: String,
    #[command(flatten)]
    pub token: TokenArg,
    /// Print JSON ({"template", "removed"}).
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk unwarm ID`.
pub async fn run(args: UnwarmArgs) -> anyhow::Result<()> {
    let id = &args.template;
    let client = StoreClient::new(&args.store, args.token.resolve()?, None);
    let answer = client.remove_wish(id).await?;
    if args.json {
        return print_json(&answer);
    }
    if answer.removed {
        println!("{id}: wish removed; nodes unpin it at their next heartbeat");
    } else {
        println!("{id}: there was no wish for it");
    }
    Ok(())
}
