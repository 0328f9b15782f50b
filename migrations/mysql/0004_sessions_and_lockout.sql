-- Lockout that strangers cannot cause, enrollment bound to its ticket,
-- sessions that end, withdrawable keys, per-client quotas
-- (same schema as migrations/sqlite/0004).

-- Consecutive failed logins of the account from every client together; at
-- the cap the account is locked until an administrator unlocks it.
ALTER TABLE users
    ADD COLUMN failed_logins INT NOT NULL DEFAULT 0,
    ADD COLUMN locked_at DATETIME(6) NULL;

-- The TOTP secret this ticket offers for enrollment (sealed like
-- users.totp_secret); a code for it confirms exactly this secret.
ALTER TABLE login_tickets ADD COLUMN enrollment_secret VARBINARY(128) NULL;

-- When the login this token descends from ends, however often it is
-- refreshed (NULL on rows made before: their expires_at).
ALTER TABLE refresh_tokens ADD COLUMN session_expires_at DATETIME(6) NULL;

-- A key withdrawn by an operator: neither published nor used again.
ALTER TABLE signing_keys ADD COLUMN withdrawn_at DATETIME(6) NULL;

-- Calls per client and purpose in a fixed window (registrations).
CREATE TABLE client_quotas (
    -- SHA-256 of the purpose and the client address.
    subject      BINARY(32) NOT NULL PRIMARY KEY,
    -- Unix seconds the current window started.
    window_start BIGINT     NOT NULL,
    used         INT        NOT NULL,
    KEY client_quotas_window (window_start)
) ENGINE=InnoDB;
