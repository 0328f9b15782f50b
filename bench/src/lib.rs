//! What the benchmark binaries share: the runner that measures a scenario,
//! and the traffic a shop's callers send (see each binary for its use).

pub mod runner;
pub mod traffic;

use storegate_testkit::Backend;

/// The database a run uses: a fresh one on this MySQL server, else SQLite;
/// and its name for the report.
pub fn backend(mysql_server_url: Option<&str>) -> (Backend, &'static str) {
    match mysql_server_url {
        Some(url) => (Backend::MySql(url.to_owned()), "MySQL"),
        None => (Backend::Sqlite, "SQLite"),
    }
}
