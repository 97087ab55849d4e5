//! Embedded result store (to be written).
