mod broker;
mod generation;
mod helpers;
mod proxy;
mod service;
mod store;
mod topology;
mod tracking;
