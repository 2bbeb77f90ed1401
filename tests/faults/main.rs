//! Faults that stop this machine's shared RabbitMQ or PostgreSQL (DESIGN §6): a test binary of
//! their own, so `cargo test` never runs them beside another binary, and each test takes
//! [`shared_services::exclusive`] so they run one at a time, only when no other test binary is
//! running, and always leave both services running again. See RELIABILITY.md.

mod broker_restart;
mod db_restart;
mod first_run;
mod long_db_outage;
mod outage;
mod shared_services;
