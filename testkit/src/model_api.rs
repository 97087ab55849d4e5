//! A stand-in for the model API (to be written).
