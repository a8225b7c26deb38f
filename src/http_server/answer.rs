//! The error answer both servers send with every refusal (a 4xx or 5xx status), and
//! both clients read: one type, so a field renamed on a server fails the build of its
//! clients.

use serde::{Deserialize, Serialize};

/// `{"error": "..."}`: why the server refused the request, a sentence for a person
/// (the status code says which kind of refusal it is).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub error: String,
}

impl ErrorAnswer {
    /// The message of an error answer's body, or the body itself (trimmed, at most
    /// [`MAX_UNTYPED`] characters) when it is not one (a proxy's page, another version).
    pub fn message_of(body: &[u8]) -> String {
        match serde_json::from_slice::<ErrorAnswer>(body) {
            Ok(answer) => answer.error,
            Err(_) => String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(MAX_UNTYPED)
                .collect(),
        }
    }
}

/// The characters of a body that is not an [`ErrorAnswer`] kept for a message: enough
/// to recognise a proxy's error page, not a whole document in one line of stderr.
pub const MAX_UNTYPED: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_answer_gives_its_message_and_anything_else_its_text() {
        let body = serde_json::to_vec(&ErrorAnswer {
            error: "no such export".into(),
        })
        .unwrap();
        assert_eq!(body, br#"{"error":"no such export"}"#);
        assert_eq!(ErrorAnswer::message_of(&body), "no such export");
        assert_eq!(ErrorAnswer::message_of(b"  Bad Gateway\n"), "Bad Gateway");
        let long = vec![b'x'; 2 * MAX_UNTYPED];
        assert_eq!(ErrorAnswer::message_of(&long).len(), MAX_UNTYPED);
    }
}
