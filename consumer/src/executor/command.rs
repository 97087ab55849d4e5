//! The `command` executor.
