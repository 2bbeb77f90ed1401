//! Scale-out on a RabbitMQ cluster: the service on a three-node cluster of the test's own, a node
//! killed under load, the reliability suite's books. Slow (a cluster to form, a load to run), so
//! the test is `#[ignore]`d; run it with
//!
//! ```text
//! cargo test --test cluster -- --ignored --nocapture
//! ```
//!
//! It needs RabbitMQ installed (not running: it starts its own nodes beside the machine's
//! broker) and the PostgreSQL the other suites use. See RELIABILITY.md for its last figures.

mod inspect_proxy;
mod node_failure;
mod rabbit;
