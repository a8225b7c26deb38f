//! The one neutral operation type: what a frontend asked of an image, named the same
//! whichever door it came through, for metrics and traces.

/// An operation on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read bytes ([`crate::ReadImage::read_at`] or its zero-copy pieces).
    Read,
    /// Write bytes ([`crate::WriteImage::write_at`]).
    Write,
    /// Make writes durable ([`crate::WriteImage::flush`]).
    Flush,
    /// Drop a range ([`crate::SparseImage::trim`]).
    Trim,
    /// Zero a range ([`crate::SparseImage::write_zeroes`] or its allocated form).
    WriteZeroes,
    /// Ask which ranges hold data ([`crate::SparseImage::extents`]).
    Extents,
    /// A read-ahead hint ([`crate::PrefetchImage::prefetch`]).
    Prefetch,
    /// The client said it is leaving (NBD_CMD_DISC); no image call.
    Disconnect,
}

impl Op {
    /// Every operation, for metrics that pre-register a series per operation.
    pub const ALL: [Op; 8] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Extents,
        Op::Prefetch,
        Op::Disconnect,
    ];

    /// A short lowercase name for logs and traces ("read", "write_zeroes", ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Extents => "extents",
            Op::Prefetch => "prefetch",
            Op::Disconnect => "disconnect",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The frontend an operation came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    /// The NBD server (TCP or unix socket clients; the kernel's devices connect to it
    /// too, and are told apart by the image set that opened them, not here).
    Nbd,
    /// The FUSE mount's files.
    Fuse,
    /// The kernel's ublk driver (`/dev/ublkbN`).
    Ublk,
}

impl Door {
    /// A short lowercase name ("nbd", "fuse", "ublk").
    pub fn name(self) -> &'static str {
        match self {
            Door::Nbd => "nbd",
            Door::Fuse => "fuse",
            Door::Ublk => "ublk",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_distinct_name() {
        let names: std::collections::HashSet<_> = Op::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(names.len(), Op::ALL.len());
    }
}
