//! The `echo` executor.
