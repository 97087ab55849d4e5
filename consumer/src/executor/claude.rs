//! The `claude` executor.
