//! Several nodes, one run: workers on any machine take children from Redis Streams and
//! publish their scores there, with nothing but genomes and scores on the wire
//! ([`wire`]). The coordinator's side ([`coordinate`]) publishes the run and drives the
//! [`crate::run::Coordinator`] through the streams; a worker's side ([`serve`]) evaluates
//! children with any [`crate::run::Worker`]. Delivery is at least once (a consumer group per
//! run, acknowledgement after the result is published, `XAUTOCLAIM` after a visibility
//! timeout); application is exactly once (results are idempotent by child number).

pub mod connect;
pub mod coordinate;
pub mod serve;
pub mod wire;

pub use connect::BrokerUrl;
pub use coordinate::{
    drive_broker, finish_run, live_workers, publish_run, read_run, BrokerStats, RunOnBroker,
    WorkerStatus,
};
pub use serve::{consumer_name, serve, ServeOptions, Served};
