//! `lazyblk attach EXPORT`: a kernel block device (`/dev/nbdN`, or `/dev/ublkbN` with
//! `--kind ublk`) over one of a node's exports (it survives a daemon restart); prints
//! the device path.

use clap::Args;

use super::args::NodeArg;
use super::node_client::NodeClient;
use super::output::print_json;
use crate::daemon::api::AttachBody;

#[derive(Args, Debug, Clone)]
pub struct AttachArgs {
    /// A template id (read-only device) or sandbox id (read-write device).
    pub export: String,
    /// The device to use, /dev/nbdN (or /dev/ublkbN with --kind ublk); the first free
    /// one when omitted.
    #[arg(long)]
    pub device: Option<String>,
    /// The kernel driver: nbd (any kernel with the nbd module) or ublk (io_uring
    /// based, fewer copies; offered on the kernels the daemon lists, see
    /// --ublk-kernel). Both outlive a daemon restart.
    #[arg(long, value_enum, default_value = "nbd")]
    pub kind: DeviceKind,
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

/// The kernel driver behind an attached device.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Nbd,
    Ublk,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Nbd => "nbd",
            DeviceKind::Ublk => "ublk",
        }
    }
}

/// `lazyblk attach EXPORT [--kind nbd|ublk] [--device /dev/nbdN]`.
pub async fn run(args: AttachArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node)?;
    let body = AttachBody {
        export: args.export.clone(),
        device: args.device.clone(),
        connections: Some(args.connections),
        kind: Some(args.kind.name().to_string()),
    };
    let r = node.attach(&body).await?;
    if args.json {
        return print_json(&r);
    }
    println!("{}", crate::printable::printable(&r.device));
    Ok(())
}
