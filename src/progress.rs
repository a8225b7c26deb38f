//! Progress (stub).
