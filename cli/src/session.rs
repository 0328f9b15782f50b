//! The signed-in session of the `storegate` CLI: tokens in a file only the
//! user can read, refreshed before they expire. The same file keeps this
//! client's device token of each account it logged in to: sent with the
//! account's next BeginLogin, it exempts this client from the account-wide
//! lock that strangers' failures can set. It outlives a logout (it is no
//! session: alone it lets nobody in).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
pub struct Session {
    /// Empty when signed out (the file then keeps only device tokens).
    pub username: String,
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds when the access token expires.
    pub expires_at: i64,
    /// This client's device token of each account (lower-cased name) it
    /// completed a login of.
    #[serde(default)]
    pub devices: BTreeMap<String, String>,
}

/// `$STOREGATE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/storegate`, else `~/.config/storegate`.
pub fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STOREGATE_CONFIG_DIR") {
        return Ok(dir.into());
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("storegate"));
    }
    let home =
        std::env::var_os("HOME").context("cannot find a config folder: set HOME or STOREGATE_CONFIG_DIR")?;
    Ok(PathBuf::from(home).join(".config").join("storegate"))
}

fn session_path() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("session.json"))
}

/// Refuses a session folder that someone else could change: a user who can
/// write there can swap the session for one of theirs, or read the tokens
/// of one they planted. Readable by others is fine (the file itself is
/// 0600).
fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Some(why) = storegate::private_files::not_private(dir, 0o055, false)
        .with_context(|| format!("cannot check {}", dir.display()))?
    {
        anyhow::bail!(
            "refusing to keep the session in {}: the folder {why}; use a folder of your own \
             (STOREGATE_CONFIG_DIR), or fix it with `chmod go-w {0}`",
            dir.display()
        );
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

impl Session {
    /// The session signed in now, if any.
    pub fn load() -> anyhow::Result<Option<Session>> {
        Ok(Self::load_from(&session_path()?)?.filter(|s| !s.refresh_token.is_empty()))
    }

    /// This client's device token of `username` (empty: none).
    pub fn device_token(username: &str) -> anyhow::Result<String> {
        let file = Self::load_from(&session_path()?)?;
        Ok(file.and_then(|mut s| s.devices.remove(&username.to_lowercase())).unwrap_or_default())
    }

    /// A new session of `username`, keeping the device tokens of the
    /// file (and `device_token`, when the server gave one, as this
    /// account's).
    pub fn start(
        username: &str,
        access_token: String,
        refresh_token: String,
        expires_at: i64,
        device_token: String,
    ) -> anyhow::Result<Session> {
        let mut devices = Self::load_from(&session_path()?)?.map(|s| s.devices).unwrap_or_default();
        let username = username.to_lowercase();
        if !device_token.is_empty() {
            devices.insert(username.clone(), device_token);
        }
        Ok(Session { username, access_token, refresh_token, expires_at, devices })
    }

    fn load_from(path: &Path) -> anyhow::Result<Option<Session>> {
        match path.parent() {
            Some(dir) if dir.exists() => check_private_dir(dir)?,
            _ => return Ok(None),
        }
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is damaged; log in again", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the session with mode 0600, replacing the old one. Folders
    /// the CLI creates (parents too) are made 0700; an existing one that
    /// others could write to, or that is someone else's, is refused.
    pub fn save(&self) -> anyhow::Result<()> {
        self.save_to(&session_path()?)
    }

    fn save_to(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("session path has no folder")?;
        storegate::private_files::create_dir_all(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        check_private_dir(dir)?;
        // A name of this process's own: two CLI commands saving at once (two
        // terminals) each rename a whole file into place, the last one wins.
        let temp = dir.join(format!("session.json.{}.tmp", std::process::id()));
        // A leftover from an interrupted save could carry other permissions.
        let _ = std::fs::remove_file(&temp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&temp).with_context(|| format!("cannot write {}", temp.display()))?;
        file.write_all(&serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        Ok(())
    }

    /// Signs out here: the session's tokens are forgotten, the device
    /// tokens kept (the file goes when there are none).
    pub fn remove() -> anyhow::Result<()> {
        Self::remove_and_forget(None)
    }

    /// Signs out and forgets this client's device token of `username` too
    /// (the server ended it: a factor reset).
    pub fn remove_with_device(username: &str) -> anyhow::Result<()> {
        Self::remove_and_forget(Some(&username.to_lowercase()))
    }

    fn remove_and_forget(device_of: Option<&str>) -> anyhow::Result<()> {
        let path = session_path()?;
        let file = Self::load_from(&path)?.map(|mut file| {
            if let Some(username) = device_of {
                file.devices.remove(username);
            }
            file
        });
        match file {
            Some(file) if !file.devices.is_empty() => Session {
                username: String::new(),
                access_token: String::new(),
                refresh_token: String::new(),
                expires_at: 0,
                devices: file.devices,
            }
            .save_to(&path),
            _ => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
        }
    }

    /// The access token's claims, read without verification (the servers
    /// verify; this is for display and expiry only).
    pub fn claims(&self) -> anyhow::Result<storegate::token::Claims> {
        let payload = self.access_token.split('.').nth(1).context("the stored access token is not a JWT")?;
        Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?)
    }

    pub fn expires_soon(&self) -> bool {
        // A margin for clock skew and the call's own duration.
        self.expires_at - 30 <= unix_now()
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn session() -> Session {
        Session {
            username: "alice".into(),
            access_token: "a.b.c".into(),
            refresh_token: "r".into(),
            expires_at: 0,
            devices: BTreeMap::from([("alice".into(), "device-token".into())]),
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("storegate-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn folders_the_cli_makes_are_private_parents_too() {
        let root = scratch("new");
        let path = root.join("home/.config/storegate/session.json");
        session().save_to(&path).unwrap();
        for dir in
            [&root, &root.join("home"), &root.join("home/.config"), &root.join("home/.config/storegate")]
        {
            assert_eq!(mode(dir), 0o700, "{}", dir.display());
        }
        assert_eq!(mode(&path), 0o600);
        let loaded = Session::load_from(&path).unwrap().unwrap();
        assert_eq!(loaded.username, "alice");
        assert_eq!(loaded.devices["alice"], "device-token", "the device token is kept with the session");
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The attack: a session kept in a folder others can write to can be
    /// swapped or read by planting a file or link there.
    #[test]
    fn a_folder_others_can_write_to_or_someone_elses_is_refused() {
        let dir = scratch("shared");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("session.json");
        for loose in [0o777, 0o1777, 0o770, 0o720, 0o702] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(loose)).unwrap();
            let message = format!("{:#}", session().save_to(&path).unwrap_err());
            assert!(message.contains(&dir.display().to_string()), "names the folder: {message}");
            assert!(message.contains("changed by other users"), "{message}");
            assert!(!path.exists(), "nothing written");
            assert!(Session::load_from(&path).is_err(), "nor read from there");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        session().save_to(&path).unwrap();
        assert!(Session::load_from(&path).unwrap().is_some(), "readable by others is fine: the file is 0600");
        if storegate::private_files::current_uid() == 0 {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let message = format!("{:#}", session().save_to(&path).unwrap_err());
            assert!(message.contains("belongs to another user"), "{message}");
            assert!(Session::load_from(&path).is_err());
        } else {
            eprintln!("not root: the other-owner case needs chown, skipped");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
