//! `lazyblk overlay create|delete|list`: sandboxes' copy-on-write overlays on a node
//! (NBD export and FUSE file named by the sandbox).

use clap::{Args, Subcommand};

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::{aligned, human_bytes, print_json};
use crate::daemon::api::CreateOverlay;
use crate::daemon::sandboxes::SandboxStatus;
use crate::printable::printable;

#[derive(Subcommand, Debug, Clone)]
pub enum OverlayCommand {
    /// Create a sandbox's copy-on-write overlay over a template.
    Create(OverlayCreateArgs),
    /// Delete a sandbox's overlay.
    Delete(OverlayDeleteArgs),
    /// List overlays on the node.
    List(OverlayListArgs),
}

#[derive(Args, Debug, Clone)]
pub struct OverlayCreateArgs {
    pub template: String,
    #[arg(long)]
    pub sandbox: String,
    #[command(flatten)]
    pub node: NodeArg,
    /// Print the new overlay as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct OverlayDeleteArgs {
    pub sandbox: String,
    #[command(flatten)]
    pub node: NodeArg,
    /// Delete even if it is in use.
    #[arg(long)]
    pub force: bool,
    /// Print JSON ({"sandbox", "deleted"}).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct OverlayListArgs {
    #[command(flatten)]
    pub node: NodeArg,
    /// Print the overlays as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `overlay delete --json` prints (the daemon answers 204 without a body).
#[derive(serde::Serialize)]
struct Deleted<'a> {
    sandbox: &'a str,
    deleted: bool,
}

/// `lazyblk overlay create|delete|list`.
pub async fn run(command: OverlayCommand) -> anyhow::Result<()> {
    match command {
        OverlayCommand::Create(a) => {
            let node = NodeClient::new(&a.node)?;
            let body = CreateOverlay {
                template: a.template,
                sandbox: a.sandbox,
            };
            let o = node.create_overlay(&body).await?;
            if a.json {
                return print_json(&o);
            }
            println!(
                "created overlay {} over {} ({})",
                printable(&o.sandbox),
                printable(&o.template),
                human_bytes(o.size)
            );
        }
        OverlayCommand::Delete(a) => {
            let node = NodeClient::new(&a.node)?;
            node.delete_overlay(&a.sandbox, a.force).await?;
            if a.json {
                return print_json(&Deleted {
                    sandbox: &a.sandbox,
                    deleted: true,
                });
            }
            println!("deleted overlay {}", a.sandbox);
        }
        OverlayCommand::List(a) => {
            let overlays = NodeClient::new(&a.node)?.overlays().await?;
            if a.json {
                return print_json(&overlays);
            }
            print!("{}", table(&overlays));
        }
    }
    Ok(())
}

/// The overlays, one line each.
fn table(overlays: &[SandboxStatus]) -> String {
    let mut rows = vec![["SANDBOX", "TEMPLATE", "WRITTEN", "USERS"].map(String::from)];
    for o in overlays {
        // A commit under way says so: the sandbox cannot be deleted or committed again
        // until it returns.
        let committing = match &o.committing {
            Some(t) => format!("  (committing as {})", printable(t)),
            None => String::new(),
        };
        rows.push([
            printable(&o.sandbox).into_owned(),
            printable(&o.template).into_owned(),
            human_bytes(o.written_bytes),
            format!("{}{committing}", o.users.len()),
        ]);
    }
    aligned(&rows)
}
