//! homelab-matrix: one supervisor that turns a Debian host into a private Matrix server.
//!
//! Layering (DESIGN.md §11): `app` and `cli` wire feature modules (`synapse`, `postgres`,
//! `control`) on top of foundations (`supervisor`, `config`, `secrets`, `fsutil`, `fdlimit`, `units`, `uri`).
//! Only `supervisor` creates processes.

pub mod acme;
pub mod alerts;
pub mod app;
pub mod apt;
pub mod backup;
pub mod bot;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod coturn;
pub mod discovery;
pub mod doctor;
pub mod element;
pub mod fdlimit;
pub mod fsutil;
pub mod http;
pub mod instance;
pub mod invite;
pub mod logging;
pub mod matrixrtc;
pub mod notify;
pub mod postgres;
pub mod redis;
pub mod secrets;
pub mod stun;
pub mod supervisor;
pub mod synapse;
pub mod tls;
pub mod units;
pub mod uri;

pub use logging::init as init_tracing;

/// mimalloc instead of glibc's malloc, for the supervisor, its tests and the bench example
/// alike: the front door's h2 path allocates and frees per frame and per stream, and glibc
/// spent 6% of its CPU there (fastbin consolidation among it). Measured with
/// packaging/bench/front-door. Built with `no_thp`: mimalloc otherwise asks for transparent
/// huge pages on its arenas, which cost 14 MiB at idle and 40% more per held connection.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
