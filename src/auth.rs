//! Bearer tokens on the HTTP APIs of the store and the daemon: the scheme is matched
//! without regard to case (RFC 9110, section 11.1), and tokens are compared in time
//! independent of where they differ.

use axum::http::{header, HeaderMap};

/// The bearer token a request carries, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether the request carries `expected` as its bearer token.
pub fn carries(headers: &HeaderMap, expected: &str) -> bool {
    bearer(headers).is_some_and(|given| same_token(given, expected))
}

/// Compares tokens in time independent of where they differ (the length is not secret).
pub fn same_token(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, value.parse().unwrap());
        h
    }

    #[test]
    fn scheme_is_case_insensitive_and_tokens_must_match() {
        assert!(carries(&with("Bearer tok"), "tok"));
        assert!(carries(&with("bearer tok"), "tok"));
        assert!(carries(&with("BEARER tok"), "tok"));
        assert!(!carries(&with("Basic tok"), "tok"));
        assert!(!carries(&with("Bearer tok2"), "tok"));
        assert!(!carries(&with("Bearer to"), "tok"));
        assert!(!carries(&HeaderMap::new(), "tok"));
    }
}
