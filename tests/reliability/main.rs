//! Reliability suite (DESIGN §6 under fault, with figures): the real binary as child processes,
//! faults injected, the books checked. Faults that stop the machine's shared RabbitMQ or
//! PostgreSQL live in the `faults` test binary. See RELIABILITY.md.

mod decode_props;
mod held_tier;
mod kill9;
mod poison;
mod provider_faults;
