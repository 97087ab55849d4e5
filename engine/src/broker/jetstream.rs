//! NATS JetStream backend (to be written).
