//! Redis result store (to be written).
