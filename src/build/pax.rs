//! An entry's PAX records, parsed by their lengths (values may hold any byte, and the
//! `tar` crate splits records at line breaks): its path, link target, owner and time
//! where they override the header, and its extended attributes (`SCHILY.xattr.*`), whose
//! names must be in a namespace Linux and ext4 have.

use anyhow::{bail, Context};

use super::headers::Headers;
use super::limits::{self, bytes, Refused};

/// Extended attribute namespaces Linux has and ext4 stores; a name outside them could
/// only be a mistake or an attempt to pass debugfs something else (`-f/HOST/FILE`).
const XATTR_NAMESPACES: [&str; 3] = ["user.", "trusted.", "security."];
/// The `system.` attributes ext4 stores: POSIX ACLs (`system.data` is ext4's own inline
/// data and must not come from an archive).
const XATTR_SYSTEM_NAMES: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];
/// The longest extended attribute name Linux has (XATTR_NAME_MAX).
const XATTR_NAME_MAX: usize = 255;

/// What an entry's PAX records say that the tar crate does not give as bytes.
#[derive(Default)]
pub struct Pax {
    pub path: Option<Vec<u8>>,
    pub linkpath: Option<Vec<u8>>,
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    pub mtime: Option<u64>,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Pax {
    pub fn of(headers: &Headers) -> anyhow::Result<Pax> {
        let mut pax = Pax::default();
        let Some(records) = headers.current_pax() else {
            return Ok(pax);
        };
        let number = |v: &[u8]| -> Option<u64> {
            // mtime may carry a fraction of a second.
            let whole = v.split(|&b| b == b'.').next()?;
            std::str::from_utf8(whole).ok()?.parse().ok()
        };
        let mut attrs = 0;
        for (key, value) in pax_records(&records).context("a layer entry's PAX header")? {
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"linkpath" => pax.linkpath = Some(value.to_vec()),
                b"uid" => pax.uid = number(value),
                b"gid" => pax.gid = number(value),
                b"mtime" => pax.mtime = number(value),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        let name = xattr_name(name)?;
                        attrs += name.len() + value.len();
                        if attrs > limits::MAX_XATTR_BYTES {
                            bail!(Refused {
                                what: format!("extended attributes of {}", bytes(attrs as u64)),
                                limit: format!(
                                    "{} per file (what ext4 holds for an inode)",
                                    bytes(limits::MAX_XATTR_BYTES as u64)
                                ),
                                flag: "",
                            });
                        }
                        pax.xattrs.push((name, value.to_vec()));
                    }
                }
            }
        }
        Ok(pax)
    }
}

/// An extended attribute name, refused unless it is in a namespace Linux and ext4 have.
fn xattr_name(name: &[u8]) -> anyhow::Result<String> {
    let shown = limits::shown(name);
    let text = std::str::from_utf8(name)
        .ok()
        .filter(|n| !n.is_empty() && n.len() <= XATTR_NAME_MAX)
        .filter(|n| !n.bytes().any(|b| b.is_ascii_control()))
        .with_context(|| {
            format!("the extended attribute name {shown} is not 1 to {XATTR_NAME_MAX} bytes of printable UTF-8")
        })?;
    let known = XATTR_NAMESPACES
        .iter()
        .any(|ns| text.len() > ns.len() && text.starts_with(ns))
        || XATTR_SYSTEM_NAMES.contains(&text);
    if !known {
        bail!(
            "the extended attribute {shown} is in no namespace ext4 stores (user., trusted., security., or system.posix_acl_access/default)"
        );
    }
    Ok(text.to_string())
}

/// PAX records (`LENGTH KEY=VALUE\n`) parsed by their lengths: values may hold any byte.
pub fn pax_records(mut data: &[u8]) -> anyhow::Result<Vec<(&[u8], &[u8])>> {
    /// Digits of a record's length (records are bounded by the header limit).
    const MAX_DIGITS: usize = 20;
    let mut out = Vec::new();
    while !data.is_empty() && data[0] != 0 {
        let space = data
            .iter()
            .take(MAX_DIGITS + 1)
            .position(|&b| b == b' ')
            .ok_or_else(|| anyhow::anyhow!("a malformed PAX record (no length)"))?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("a malformed PAX record length"))?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            anyhow::bail!("a malformed PAX record of {len} bytes");
        }
        let body = &data[space + 1..len - 1];
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| anyhow::anyhow!("a PAX record without `=`"))?;
        out.push((&body[..eq], &body[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_records_are_errors() {
        assert!(pax_records(b"99 path=x\n").is_err());
        assert!(pax_records(b"x path=x\n").is_err());
        assert!(pax_records(b"10 pathx\n").is_err());
        assert_eq!(pax_records(b"11 path=ab\n").unwrap().len(), 1);
    }

    #[test]
    fn attribute_names_outside_linux_namespaces_are_refused() {
        assert_eq!(xattr_name(b"security.ima").unwrap(), "security.ima");
        assert!(xattr_name(b"system.posix_acl_access").is_ok());
        for bad in [
            &b"-f/etc/shadow"[..],
            b"user.",
            b"system.data",
            b"os2.x",
            b"user.a\nb",
        ] {
            assert!(
                xattr_name(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
