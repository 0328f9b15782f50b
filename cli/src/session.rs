//! The signed-in session of the `storegate` CLI: tokens in a file only the
//! user can read, refreshed before they expire.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context as _;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
pub struct Session {
    pub username: String,
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds when the access token expires.
    pub expires_at: i64,
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

impl Session {
    pub fn load() -> anyhow::Result<Option<Session>> {
        let path = session_path()?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is damaged; log in again", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the session with mode 0600, replacing the old one. A folder
    /// the CLI creates is made 0700; an existing one is left as it is.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = session_path()?;
        let dir = path.parent().context("session path has no folder")?;
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        let temp = dir.join("session.json.tmp");
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
        std::fs::rename(&temp, &path)?;
        Ok(())
    }

    pub fn remove() -> anyhow::Result<()> {
        match std::fs::remove_file(session_path()?) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
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
