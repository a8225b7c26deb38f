//! Metrics (stub).
