//! Integration tests of the intake over HTTP, against the shared NATS and
//! Redis (each test on its own stream, consumers and key prefix), and of the
//! wire contract in `schemas/`.

mod dead_letters;
mod helpers;
mod ops;
mod queries;
mod schema;
mod submit;
