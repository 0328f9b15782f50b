-- Known devices, the account-wide lock as a throttle, the refresh-token
-- reuse grace (same schema as migrations/mysql/0010).

-- Clients that completed a login (OWASP's device cookie): a device token
-- of the account exempts its BeginLogin from the account-wide lock. Each
-- login from a device replaces its token.
CREATE TABLE login_devices (
    -- SHA-256 of the device token; the token itself is never stored.
    token_hash   BLOB    NOT NULL PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The device's first login (kept when its token is replaced).
    created_at   TEXT    NOT NULL,
    -- Its latest login: when this token was issued.
    last_used_at TEXT    NOT NULL,
    expires_at   TEXT    NOT NULL
);
CREATE INDEX login_devices_user ON login_devices (user_id);
CREATE INDEX login_devices_expires ON login_devices (expires_at);

-- The device token (its hash) the ticket's BeginLogin was recognised by;
-- NULL: an unrecognised client. The code step throttles the same way.
ALTER TABLE login_tickets ADD COLUMN device_hash BLOB NULL;

-- The successor of a rotated refresh token, sealed with the master key
-- (the old token's hash as associated data), kept for the reuse grace
-- (REFRESH_REUSE_GRACE_SECS) only: a second redeem within it gets the
-- same successor.
ALTER TABLE refresh_tokens ADD COLUMN successor_sealed BLOB NULL;

-- users.failed_logins and users.locked_at (0004) are no longer read or
-- written: the account-wide lock is a login_throttle subject now. They
-- stay for replicas of the previous version during a rolling upgrade.
