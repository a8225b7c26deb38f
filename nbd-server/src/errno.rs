//! Maps an export's `std::io::Error` to one of the few error values NBD allows on the wire.

use std::io;

use crate::proto;

/// The NBD error value for `error`: the OS error code when it has an NBD equivalent,
/// else the error's kind, else `NBD_EIO`.
pub fn nbd_error(error: &io::Error) -> u32 {
    match error.raw_os_error() {
        Some(code) => from_os_code(code),
        None => from_kind(error.kind()),
    }
}

fn from_os_code(code: i32) -> u32 {
    match code {
        libc::EPERM | libc::EACCES | libc::EROFS => proto::EPERM,
        libc::ENOMEM => proto::ENOMEM,
        libc::EINVAL => proto::EINVAL,
        // The protocol asks for quota and file-size errors to read as "no space".
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => proto::ENOSPC,
        libc::EOVERFLOW => proto::EOVERFLOW,
        libc::ENOTSUP => proto::ENOTSUP,
        libc::ESHUTDOWN => proto::ESHUTDOWN,
        _ => proto::EIO,
    }
}

fn from_kind(kind: io::ErrorKind) -> u32 {
    match kind {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => proto::EPERM,
        io::ErrorKind::OutOfMemory => proto::ENOMEM,
        io::ErrorKind::InvalidInput => proto::EINVAL,
        io::ErrorKind::StorageFull => proto::ENOSPC,
        io::ErrorKind::Unsupported => proto::ENOTSUP,
        _ => proto::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_codes_with_an_nbd_value_keep_it() {
        for (code, nbd) in [
            (libc::EPERM, proto::EPERM),
            (libc::EIO, proto::EIO),
            (libc::ENOMEM, proto::ENOMEM),
            (libc::EINVAL, proto::EINVAL),
            (libc::ENOSPC, proto::ENOSPC),
            (libc::EOVERFLOW, proto::EOVERFLOW),
            (libc::ENOTSUP, proto::ENOTSUP),
            (libc::ESHUTDOWN, proto::ESHUTDOWN),
            (libc::EDQUOT, proto::ENOSPC),
        ] {
            assert_eq!(
                nbd_error(&io::Error::from_raw_os_error(code)),
                nbd,
                "errno {code}"
            );
        }
    }

    #[test]
    fn other_os_codes_are_eio() {
        assert_eq!(
            nbd_error(&io::Error::from_raw_os_error(libc::ENOENT)),
            proto::EIO
        );
        assert_eq!(
            nbd_error(&io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            proto::EIO
        );
    }

    #[test]
    fn kinds_without_os_code_map_too() {
        assert_eq!(
            nbd_error(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            proto::EINVAL
        );
        assert_eq!(
            nbd_error(&io::Error::other("chunk digest mismatch")),
            proto::EIO
        );
    }
}
