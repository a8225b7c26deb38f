//! `lazyblk attach EXPORT`: a kernel block device over one of a node's exports (it
//! survives a daemon restart); prints the device path.

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;
use crate::daemon::api::AttachBody;

#[derive(Args, Debug, Clone)]
pub struct AttachArgs {
    /// A template id (read-only device) or sandbox id (read-write device).
    pub export: String,
    /// The device to use, /dev/nbdN; the first free one when omitted.
    #[arg(long)]
    pub device: Option<String>,
    /// Sockets the kernel gets for the device (1 to 16), served in parallel; more than
    /// one needs the netlink interface (every export advertises multi-conn: a flush on
    /// one connection covers the writes done on all).
    #[arg(long, default_value = "1")]
    pub connections: u32,
    #[command(flatten)]
    pub node: NodeArg,
    /// Print JSON (device, export, size, read_only).
    #[arg(long)]
    pub json: bool,
}

/// `lazyblk attach EXPORT [--device /dev/nbdN]`.
pub async fn run(args: AttachArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node)?;
    let body = AttachBody {
        export: args.export.clone(),
        device: args.device.clone(),
        connections: Some(args.connections),
    };
    let r = node.attach(&body).await?;
    if args.json {
        return print_json(&r);
    }
    println!("{}", crate::printable::printable(&r.device));
    Ok(())
}
