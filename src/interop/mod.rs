//! Other frameworks' wire formats for our contract, so their services work with ours unchanged.
//!
//! - [`masstransit`]: MassTransit 8.x on RabbitMQ (`interop.masstransit`): its envelope, its raw
//!   JSON, its message type URNs; the exchanges are declared by `topology`.
//!
//! Pure translation, like `messages`: what arrives is turned into our contract before the
//! orchestrators see it, and what we publish is turned into theirs at the publisher, so
//! validation, idempotency, tenant checks and parking stay in one place.

pub mod masstransit;
