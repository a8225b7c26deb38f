//! Checking one request header against what was negotiated: its flags, its range
//! against the export's size, its length against the payload limit, writes against a
//! read-only export. What passes becomes an [`Op`] the export can run as is; what fails
//! becomes a [`Rejection`] with the error value the protocol asks for.

use crate::proto::{self, RequestHeader};
use crate::reply::Framing;

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
        /// NBD_CMD_FLAG_DF: the reply must carry at most one content chunk.
        df: bool,
    },
    /// The payload of `len` bytes follows the header on the socket.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

/// Why a request is refused, and the NBD error value the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub error: u32,
    pub reason: &'static str,
}

/// What requests are checked against; fixed for a connection at handshake.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub framing: Framing,
    /// The id of `base:allocation`, if the client selected it.
    pub block_status_context: Option<u32>,
    /// The largest read or write payload.
    pub max_request: u32,
}

impl Limits {
    /// Checks `header`; the request may run only if this returns `Ok`.
    pub fn check(&self, header: &RequestHeader) -> Result<Op, Rejection> {
        let RequestHeader {
            flags,
            kind,
            offset,
            length: len,
            ..
        } = *header;
        let fua = flags & proto::CMD_FLAG_FUA != 0;
        match kind {
            proto::CMD_READ => {
                self.flags(flags, proto::CMD_FLAG_FUA | self.df())?;
                self.payload(len)?;
                self.within(offset, len, proto::EINVAL)?;
                let df = flags & proto::CMD_FLAG_DF != 0;
                Ok(Op::Read { offset, len, df })
            }
            proto::CMD_WRITE => {
                self.flags(flags, proto::CMD_FLAG_FUA)?;
                self.writable()?;
                self.payload(len)?;
                self.within(offset, len, proto::ENOSPC)?;
                Ok(Op::Write { offset, len, fua })
            }
            proto::CMD_DISC => Ok(Op::Disc),
            proto::CMD_FLUSH => {
                self.flags(flags, proto::CMD_FLAG_FUA)?;
                Ok(Op::Flush)
            }
            proto::CMD_TRIM => {
                self.flags(flags, proto::CMD_FLAG_FUA)?;
                self.writable()?;
                self.within(offset, len, proto::EINVAL)?;
                Ok(Op::Trim { offset, len, fua })
            }
            proto::CMD_WRITE_ZEROES => {
                self.flags(flags, proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE)?;
                self.writable()?;
                self.within(offset, len, proto::ENOSPC)?;
                let no_hole = flags & proto::CMD_FLAG_NO_HOLE != 0;
                Ok(Op::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole,
                })
            }
            proto::CMD_CACHE => {
                self.flags(flags, proto::CMD_FLAG_FUA)?;
                self.within(offset, len, proto::EINVAL)?;
                Ok(Op::Cache { offset, len })
            }
            proto::CMD_BLOCK_STATUS => {
                self.flags(flags, proto::CMD_FLAG_FUA | proto::CMD_FLAG_REQ_ONE)?;
                let context = self.block_status_context.ok_or(Rejection {
                    error: proto::EINVAL,
                    reason: "no metadata context was negotiated",
                })?;
                if len == 0 {
                    return Err(Rejection {
                        error: proto::EINVAL,
                        reason: "block status of an empty range",
                    });
                }
                self.within(offset, len, proto::EINVAL)?;
                let req_one = flags & proto::CMD_FLAG_REQ_ONE != 0;
                Ok(Op::BlockStatus {
                    offset,
                    len,
                    req_one,
                    context,
                })
            }
            _ => Err(Rejection {
                error: proto::EINVAL,
                reason: "unknown command",
            }),
        }
    }

    /// `NBD_CMD_FLAG_DF` is valid on reads once structured replies are on.
    fn df(&self) -> u16 {
        match self.framing {
            Framing::Structured => proto::CMD_FLAG_DF,
            Framing::Simple => 0,
        }
    }

    fn flags(&self, flags: u16, allowed: u16) -> Result<(), Rejection> {
        if flags & !allowed == 0 {
            Ok(())
        } else {
            Err(Rejection {
                error: proto::EINVAL,
                reason: "command flags not valid for this command",
            })
        }
    }

    fn writable(&self) -> Result<(), Rejection> {
        if self.read_only {
            Err(Rejection {
                error: proto::EPERM,
                reason: "the export is read-only",
            })
        } else {
            Ok(())
        }
    }

    fn payload(&self, len: u32) -> Result<(), Rejection> {
        if len <= self.max_request {
            Ok(())
        } else {
            Err(Rejection {
                error: proto::EINVAL,
                reason: "length is over the maximum payload",
            })
        }
    }

    /// `[offset, offset + len)` lies inside the export, else `error`.
    fn within(&self, offset: u64, len: u32, error: u32) -> Result<(), Rejection> {
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Rejection {
                error,
                reason: "the range reaches past the end of the export",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn limits(read_only: bool) -> Limits {
        Limits {
            size: SIZE,
            read_only,
            framing: Framing::Structured,
            block_status_context: Some(1),
            max_request: 1 << 16,
        }
    }

    fn request(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    fn error(result: Result<Op, Rejection>) -> u32 {
        result.expect_err("rejected").error
    }

    #[test]
    fn reads_inside_the_export_pass() {
        let op = limits(true).check(&request(proto::CMD_READ, 0, SIZE - 512, 512));
        assert_eq!(
            op,
            Ok(Op::Read {
                offset: SIZE - 512,
                len: 512,
                df: false
            })
        );
    }

    #[test]
    fn ranges_past_the_end_are_refused_with_the_spec_error() {
        let l = limits(false);
        assert_eq!(
            error(l.check(&request(proto::CMD_READ, 0, SIZE - 1, 2))),
            proto::EINVAL
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_WRITE, 0, SIZE, 1))),
            proto::ENOSPC
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_WRITE_ZEROES, 0, SIZE, 1))),
            proto::ENOSPC
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_TRIM, 0, SIZE, 1))),
            proto::EINVAL
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_CACHE, 0, SIZE, 1))),
            proto::EINVAL
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_BLOCK_STATUS, 0, SIZE, 1))),
            proto::EINVAL
        );
    }

    #[test]
    fn offsets_that_overflow_are_refused() {
        let op = limits(false).check(&request(proto::CMD_READ, 0, u64::MAX, 1));
        assert_eq!(error(op), proto::EINVAL);
    }

    #[test]
    fn writes_to_a_read_only_export_are_eperm() {
        let l = limits(true);
        for kind in [proto::CMD_WRITE, proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
            assert_eq!(
                error(l.check(&request(kind, 0, 0, 512))),
                proto::EPERM,
                "{kind}"
            );
        }
    }

    #[test]
    fn oversized_payloads_are_einval() {
        let l = limits(false);
        assert_eq!(
            error(l.check(&request(proto::CMD_READ, 0, 0, (1 << 16) + 1))),
            proto::EINVAL
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_WRITE, 0, 0, (1 << 16) + 1))),
            proto::EINVAL
        );
        // Commands without payload may cover more than the payload limit.
        let trim = l.check(&request(proto::CMD_TRIM, 0, 0, 1 << 19));
        assert_eq!(
            trim,
            Ok(Op::Trim {
                offset: 0,
                len: 1 << 19,
                fua: false
            })
        );
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let l = limits(false);
        assert_eq!(error(l.check(&request(99, 0, 0, 0))), proto::EINVAL);
        let no_hole_on_read = request(proto::CMD_READ, proto::CMD_FLAG_NO_HOLE, 0, 1);
        assert_eq!(error(l.check(&no_hole_on_read)), proto::EINVAL);
        assert_eq!(
            error(l.check(&request(proto::CMD_WRITE, 1 << 9, 0, 1))),
            proto::EINVAL
        );
    }

    #[test]
    fn df_needs_structured_replies() {
        let mut l = limits(false);
        let read = request(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 1);
        let df = |op| matches!(op, Ok(Op::Read { df, .. }) if df);
        assert!(df(l.check(&read)), "the flag reaches the read");
        assert!(!df(l.check(&request(proto::CMD_READ, 0, 0, 1))));
        l.framing = Framing::Simple;
        assert_eq!(error(l.check(&read)), proto::EINVAL);
    }

    #[test]
    fn block_status_needs_a_context_and_a_length() {
        let mut l = limits(false);
        let op = l.check(&request(
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            0,
            512,
        ));
        assert_eq!(
            op,
            Ok(Op::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true,
                context: 1
            })
        );
        assert_eq!(
            error(l.check(&request(proto::CMD_BLOCK_STATUS, 0, 0, 0))),
            proto::EINVAL
        );
        l.block_status_context = None;
        assert_eq!(
            error(l.check(&request(proto::CMD_BLOCK_STATUS, 0, 0, 512))),
            proto::EINVAL
        );
    }

    #[test]
    fn write_zeroes_carries_its_flags() {
        let flags = proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE;
        let op = limits(false).check(&request(proto::CMD_WRITE_ZEROES, flags, 4096, 4096));
        assert_eq!(
            op,
            Ok(Op::WriteZeroes {
                offset: 4096,
                len: 4096,
                fua: true,
                no_hole: true
            })
        );
    }

    #[test]
    fn disc_always_passes() {
        assert_eq!(
            limits(true).check(&request(proto::CMD_DISC, 0xffff, 7, 7)),
            Ok(Op::Disc)
        );
    }
}
