//! The NBD side of an image: which wire command stands for which neutral image
//! operation ([`Command`]). What the server serves is `lazyblk-image`'s: an
//! [`Image`](lazyblk_image::Image) opened from an [`Images`](lazyblk_image::Images)
//! set; this crate keeps only the wire mapping.

use lazyblk_image::Op;

/// A transmission command, as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_DISC (the client disconnects).
    Disc,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_CACHE (prefetch).
    Cache,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
}

impl Command {
    /// Every command, for metrics that pre-register a series per command.
    pub const ALL: [Command; 8] = [
        Command::Read,
        Command::Write,
        Command::Disc,
        Command::Flush,
        Command::Trim,
        Command::Cache,
        Command::WriteZeroes,
        Command::BlockStatus,
    ];

    /// A short lowercase name for logs and metric labels ("read", "write_zeroes", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
        }
    }

    /// The neutral image operation this command stands for (for metrics and traces).
    pub fn op(self) -> Op {
        match self {
            Command::Read => Op::Read,
            Command::Write => Op::Write,
            Command::Disc => Op::Disconnect,
            Command::Flush => Op::Flush,
            Command::Trim => Op::Trim,
            Command::Cache => Op::Prefetch,
            Command::WriteZeroes => Op::WriteZeroes,
            Command::BlockStatus => Op::Extents,
        }
    }

    /// The command a request type on the wire stands for, if this server knows it.
    pub fn from_wire(kind: u16) -> Option<Command> {
        use crate::proto::*;
        Some(match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_command_has_a_distinct_name() {
        let names: std::collections::HashSet<_> = (0..=7u16)
            .map(|kind| Command::from_wire(kind).map(|c| c.name()))
            .collect();
        assert_eq!(names.len(), 8);
        assert!(!names.contains(&None));
        assert_eq!(Command::from_wire(8), None);
        assert_eq!(Command::from_wire(0xffff), None);
    }

    #[test]
    fn every_command_is_a_distinct_image_operation() {
        let ops: std::collections::HashSet<_> = Command::ALL.iter().map(|c| c.op()).collect();
        assert_eq!(ops.len(), Command::ALL.len());
    }

    #[test]
    fn all_lists_every_command_once() {
        let names: std::collections::HashSet<_> = Command::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Command::ALL.len());
    }
}
