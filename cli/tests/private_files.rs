//! `storegate up` on the SQLite default keeps its files to its user: the
//! data folder 0700, the database, its WAL and SHM, the migration lock and
//! the development master key 0600, whatever the umask (issue 14: they were
//! 0644 in a 0755 folder, readable by every user of the machine).

use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// `storegate up` with no umask at all (every mode bit it does not set
/// itself would be granted), until it says it is up.
fn up(data: &Path) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_storegate"));
    command
        .args(["up", "--auth-listen-addr", "127.0.0.1:0", "--product-listen-addr", "127.0.0.1:0"])
        .args(["--metrics-listen-addr", "", "--product-metrics-listen-addr", ""])
        .env("DATABASE_URL", format!("sqlite://{}/storegate.db", data.display()))
        .env_remove("STOREGATE_MASTER_KEY")
        .env_remove("STOREGATE_MASTER_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn storegate up");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("storegate is up") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "storegate up ended before it was up");
    }
    child
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_data_folder_and_every_file_in_it_are_private() {
    let root = std::env::temp_dir().join(format!("storegate-private-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // Neither the folder nor its parent exists yet.
    let data = root.join("nested/storegate-data");
    let files =
        ["storegate.db", "storegate.db-wal", "storegate.db-shm", "storegate.migrate.lock", "master.key"];

    let child = up(&data);
    for dir in [&root, &root.join("nested"), &data] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    for file in files {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    stop(child);

    // Files an earlier version left open to others are closed at the next
    // start (the master key is refused instead: see auth-service's crypto).
    for file in ["storegate.db", "storegate.db-wal", "storegate.db-shm", "storegate.migrate.lock"] {
        std::fs::set_permissions(data.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let child = up(&data);
    for file in files {
        assert_eq!(mode(&data.join(file)), 0o600, "{file} after a restart");
    }
    stop(child);
    std::fs::remove_dir_all(&root).unwrap();
}
