//! Intake library.
