//! Parsing of option payloads (`NBD_OPT_INFO`/`NBD_OPT_GO` and the two meta context
//! options) and the one rule for which metadata contexts a query selects.
//!
//! The payload is already bounded by the handshake; parsing only checks that the
//! lengths inside it agree with each other.

use crate::proto::{BASE_ALLOCATION, MAX_STRING};

/// Why an option payload was refused (sent to the client as NBD_REP_ERR_INVALID text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// the option data ends early
    #[error("the option data ends early")]
    Truncated,
    /// the option data has bytes past its last field
    #[error("the option data has {0} bytes past its last field")]
    TrailingBytes(usize),
    /// a string is not UTF-8
    #[error("a string in the option data is not UTF-8")]
    NotUtf8,
    /// a string is longer than the protocol allows
    #[error("a string of {0} bytes is longer than the protocol's {MAX_STRING}")]
    StringTooLong(usize),
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// The `NBD_INFO_*` types the client asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let mut cursor = Cursor(payload);
        let name = cursor.string()?;
        let count = cursor.u16()?;
        let requests = (0..count).map(|_| cursor.u16()).collect::<Result<_, _>>()?;
        cursor.finish()?;
        Ok(Self { name, requests })
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(payload: &[u8]) -> Result<Self, PayloadError> {
        let mut cursor = Cursor(payload);
        let export = cursor.string()?;
        let count = cursor.u32()?;
        // Every query takes at least its 4-byte length, so a count larger than that is
        // a lie the payload length exposes before any allocation.
        if count as usize > cursor.0.len() / 4 {
            return Err(PayloadError::Truncated);
        }
        let queries = (0..count)
            .map(|_| cursor.string())
            .collect::<Result<_, _>>()?;
        cursor.finish()?;
        Ok(Self { export, queries })
    }

    /// Whether `base:allocation` is among the contexts these queries list
    /// (`NBD_OPT_LIST_META_CONTEXT`): no query lists everything, `base:` is the
    /// namespace's wildcard.
    pub fn lists_base_allocation(&self) -> bool {
        self.queries.is_empty()
            || self
                .queries
                .iter()
                .any(|q| q == "base:" || q == BASE_ALLOCATION)
    }

    /// Whether these queries select `base:allocation` (`NBD_OPT_SET_META_CONTEXT`):
    /// only by its full name; no query selects nothing.
    pub fn selects_base_allocation(&self) -> bool {
        self.queries.iter().any(|q| q == BASE_ALLOCATION)
    }
}

/// Reads big-endian fields off the front of a payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], PayloadError> {
        if self.0.len() < n {
            return Err(PayloadError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, PayloadError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PayloadError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A 32-bit length, then that many bytes of UTF-8.
    fn string(&mut self) -> Result<String, PayloadError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(PayloadError::StringTooLong(len));
        }
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| PayloadError::NotUtf8)
    }

    fn finish(&self) -> Result<(), PayloadError> {
        match self.0.len() {
            0 => Ok(()),
            extra => Err(PayloadError::TrailingBytes(extra)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut out = string(name);
        out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut out = string(export);
        out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            out.extend_from_slice(&string(q));
        }
        out
    }

    #[test]
    fn info_request_parses() {
        let parsed = InfoRequest::parse(&info_payload("py311", &[3, 1])).expect("valid");
        assert_eq!(parsed.name, "py311");
        assert_eq!(parsed.requests, vec![3, 1]);
    }

    #[test]
    fn info_request_with_empty_name_is_the_default_export() {
        let parsed = InfoRequest::parse(&info_payload("", &[])).expect("valid");
        assert_eq!(parsed.name, "");
    }

    #[test]
    fn info_request_length_mismatches_are_refused() {
        let mut payload = info_payload("a", &[0]);
        payload.push(0);
        assert_eq!(
            InfoRequest::parse(&payload),
            Err(PayloadError::TrailingBytes(1))
        );
        let payload = info_payload("a", &[0]);
        assert_eq!(
            InfoRequest::parse(&payload[..payload.len() - 1]),
            Err(PayloadError::Truncated)
        );
        let mut lying = 1000u32.to_be_bytes().to_vec();
        lying.extend_from_slice(b"ab\0\0");
        assert_eq!(InfoRequest::parse(&lying), Err(PayloadError::Truncated));
        assert_eq!(InfoRequest::parse(&[]), Err(PayloadError::Truncated));
    }

    #[test]
    fn names_must_be_utf8_and_short() {
        let mut payload = 2u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0xff, 0xfe, 0, 0]);
        assert_eq!(InfoRequest::parse(&payload), Err(PayloadError::NotUtf8));
        let long = "x".repeat(MAX_STRING + 1);
        assert_eq!(
            InfoRequest::parse(&info_payload(&long, &[])),
            Err(PayloadError::StringTooLong(MAX_STRING + 1))
        );
    }

    #[test]
    fn meta_context_request_parses() {
        let parsed =
            MetaContextRequest::parse(&meta_payload("t", &["base:allocation", "qemu:dirty"]))
                .expect("valid");
        assert_eq!(parsed.export, "t");
        assert_eq!(parsed.queries, vec!["base:allocation", "qemu:dirty"]);
    }

    #[test]
    fn a_huge_query_count_is_refused_before_allocating() {
        let mut payload = string("t");
        payload.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            MetaContextRequest::parse(&payload),
            Err(PayloadError::Truncated)
        );
    }

    #[test]
    fn which_queries_list_and_select_base_allocation() {
        let request = |queries: &[&str]| {
            MetaContextRequest::parse(&meta_payload("t", queries)).expect("valid")
        };
        assert!(request(&[]).lists_base_allocation());
        assert!(!request(&[]).selects_base_allocation());
        assert!(request(&["base:"]).lists_base_allocation());
        assert!(!request(&["base:"]).selects_base_allocation());
        assert!(request(&["x-a:b", "base:allocation"]).selects_base_allocation());
        assert!(!request(&["base:other"]).lists_base_allocation());
        assert!(!request(&["qemu:dirty-bitmap:a"]).selects_base_allocation());
    }
}
