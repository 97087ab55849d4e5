//! Embedded queue backend (to be written).
