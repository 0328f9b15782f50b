//! What the benchmark binaries share: the runner that measures a scenario,
//! and the traffic a shop's callers send (see each binary for its use).

pub mod runner;
pub mod traffic;
