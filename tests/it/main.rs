//! The integration tests, one binary: a module per area, and the shared support.
//!
//! Every test talks to real processes it starts itself (nats-server, the clients, SoftHSM,
//! OpenBao, moto, Prometheus) on free ports. One binary links the library once; cargo builds
//! no other test target (`autotests = false` in Cargo.toml). Tests run as threads of this one
//! process, so none may change process-wide state (environment variables, signal handlers,
//! the working directory): a value a component reads from the environment is passed to a child
//! process instead (see `kms_binding`).

mod support;

mod audit;
mod auth;
mod bench;
mod cli;
mod client_matrix;
mod cluster;
mod data_path;
mod demo;
mod deploy;
mod differential;
mod faults;
mod hostile;
mod kms;
mod kms_aws;
mod kms_binding;
mod layers;
mod lifecycle;
mod observability;
mod protocol;
mod reload;
mod rotation;
mod scale;
mod scopes;
mod security;
mod slow_agent;
mod status;
mod tls;
