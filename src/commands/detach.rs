//! `lazyblk detach /dev/nbdN|/dev/ublkbN [--force]`: disconnects a kernel block device a node
//! attached.

use anyhow::bail;
use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;
use crate::printable::printable;

#[derive(Args, Debug, Clone)]
pub struct DetachArgs {
    /// The device, /dev/nbdN or /dev/ublkbN.
    pub device: String,
    #[command(flatten)]
    pub node: NodeArg,
    /// Detach even if the device is mounted or held open (its I/O then fails).
    #[arg(long)]
    pub force: bool,
    /// Print the detached device's last status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk detach /dev/nbdN`.
pub async fn run(args: DetachArgs) -> anyhow::Result<()> {
    let name = args.device.trim_start_matches("/dev/");
    if name.is_empty() || name.contains('/') {
        bail!(
            "{:?} is not a kernel block device (expected /dev/nbdN or /dev/ublkbN)",
            args.device
        );
    }
    let r = NodeClient::new(&args.node)?
        .detach(name, args.force)
        .await?;
    if args.json {
        return print_json(&r);
    }
    println!(
        "detached {} (export {})",
        printable(&r.device),
        printable(&r.export)
    );
    Ok(())
}
