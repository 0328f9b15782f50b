-- Known devices, the account-wide lock as a throttle, the refresh-token
-- reuse grace (same schema as migrations/sqlite/0010; MySQL has no 0009,
-- which is SQLite's full-text queue: numbers need not be contiguous).

-- Clients that completed a login (OWASP's device cookie): a device token
-- of the account exempts its BeginLogin from the account-wide lock. Each
-- login from a device replaces its token.
CREATE TABLE login_devices (
    -- SHA-256 of the device token; the token itself is never stored.
    token_hash   BINARY(32)  NOT NULL PRIMARY KEY,
    user_id      BIGINT      NOT NULL,
    -- The device's first login (kept when its token is replaced).
    created_at   DATETIME(6) NOT NULL,
    -- Its latest login: when this token was issued.
    last_used_at DATETIME(6) NOT NULL,
    expires_at   DATETIME(6) NOT NULL,
    KEY login_devices_user (user_id),
    KEY login_devices_expires (expires_at),
    CONSTRAINT login_devices_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The device token (its hash) the ticket's BeginLogin was recognised by;
-- NULL: an unrecognised client. The code step throttles the same way.
ALTER TABLE login_tickets ADD COLUMN device_hash BINARY(32) NULL;

-- The successor of a rotated refresh token, sealed with the master key
-- (the old token's hash as associated data), kept for the reuse grace
-- (REFRESH_REUSE_GRACE_SECS) only: a second redeem within it gets the
-- same successor.
ALTER TABLE refresh_tokens ADD COLUMN successor_sealed VARBINARY(128) NULL;

-- users.failed_logins and users.locked_at (0004) are no longer read or
-- written: the account-wide lock is a login_throttle subject now. They
-- stay for replicas of the previous version during a rolling upgrade.
