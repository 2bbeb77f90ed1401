mod broker;
mod helpers;
mod store;
mod topology;
