//! Files and folders only their owner may use: the SQLite database and its
//! companions, the development master key, the CLI's session.
//!
//! Modes are set explicitly after creation, not left to the umask: a umask of
//! 022 (the usual one) would make a database 0644 and its folder 0755, and a
//! stricter one could leave a folder its owner cannot enter. A file or folder
//! is only ever created with at most the final mode, so there is no moment
//! when it is looser.

use std::{io, path::Path};

/// Mode of the files: read and write for the owner only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the folders: the owner only.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with mode 0700. Folders that
/// already exist are left as they are.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all(parent)?;
    }
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    match builder.create(dir) {
        Ok(()) => set_mode(dir, DIR_MODE),
        // Made by another process starting beside this one.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `path` empty with mode 0600 if it does not exist; tightens an
/// existing file of this user's that others could read or write (left by
/// an earlier version) to 0600.
pub fn create_or_tighten_file(path: &Path) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    match options.open(path) {
        Ok(_) => set_mode(path, FILE_MODE),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tighten(path),
        Err(e) => Err(e),
    }
}

/// Sets an existing file of this user's to 0600 if it is looser; a missing
/// file is fine (SQLite makes its WAL and SHM files only when needed).
pub fn tighten(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if metadata.is_file() && metadata.uid() == current_uid() && metadata.permissions().mode() & 0o077 != 0
        {
            set_mode(path, FILE_MODE)?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// The effective user id of this process.
#[cfg(unix)]
pub fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a file or folder must not be trusted with a secret, or None when it
/// is private: it belongs to another user (root too, if `root_may_own`), or
/// has mode bits for group and others beyond `allowed` (e.g. 0o040: group
/// may read).
#[cfg(unix)]
pub fn not_private(path: &Path, allowed: u32, root_may_own: bool) -> io::Result<Option<String>> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let metadata = std::fs::metadata(path)?;
    let mode = metadata.permissions().mode() & 0o777;
    let (owner, uid) = (metadata.uid(), current_uid());
    Ok(if owner != uid && !(root_may_own && owner == 0) {
        Some(format!("belongs to another user (uid {owner}; this process runs as uid {uid})"))
    } else if mode & 0o077 & !allowed != 0 {
        let how = if mode & 0o022 != 0 { "changed" } else { "read" };
        Some(format!("can be {how} by other users (mode {mode:04o})"))
    } else {
        None
    })
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn folders_and_files_are_private_whatever_the_umask() {
        let root = std::env::temp_dir().join(format!("storegate-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // No umask at all, so that every mode bit would be granted. (A
        // stricter one is not tried: the umask is the whole process's, and
        // other tests create folders meanwhile.)
        // SAFETY: umask only changes this process's creation mask.
        let old = unsafe { libc::umask(0) };
        let dir = root.join("a/b");
        let created = create_dir_all(&dir).and_then(|()| create_or_tighten_file(&dir.join("f")));
        unsafe { libc::umask(old) };
        created.unwrap();
        assert_eq!((mode(&root), mode(&root.join("a")), mode(&dir)), (0o700, 0o700, 0o700));
        assert_eq!(mode(&dir.join("f")), 0o600);
        std::fs::set_permissions(root.join("a/b/f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        create_or_tighten_file(&root.join("a/b/f")).unwrap();
        assert_eq!(mode(&root.join("a/b/f")), 0o600, "an existing loose file is tightened");
        let f = root.join("a/b/f");
        assert!(not_private(&f, 0, false).unwrap().is_none());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(not_private(&f, 0, false).unwrap().unwrap().contains("read by other users (mode 0640)"));
        assert!(not_private(&f, 0o040, false).unwrap().is_none(), "group read allowed");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(not_private(&f, 0o040, false).unwrap().unwrap().contains("changed by other users"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
