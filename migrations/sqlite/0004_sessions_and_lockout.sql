-- Lockout that strangers cannot cause, enrollment bound to its ticket,
-- sessions that end, withdrawable keys, per-client quotas
-- (same schema as migrations/mysql/0004).

-- Consecutive failed logins of the account from every client together; at
-- the cap the account is locked until an administrator unlocks it.
ALTER TABLE users ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_at TEXT NULL;

-- The TOTP secret this ticket offers for enrollment (sealed like
-- users.totp_secret); a code for it confirms exactly this secret.
ALTER TABLE login_tickets ADD COLUMN enrollment_secret BLOB NULL;

-- When the login this token descends from ends, however often it is
-- refreshed (NULL on rows made before: their expires_at).
ALTER TABLE refresh_tokens ADD COLUMN session_expires_at TEXT NULL;
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

-- A key withdrawn by an operator: neither published nor used again.
ALTER TABLE signing_keys ADD COLUMN withdrawn_at TEXT NULL;

-- Calls per client and purpose in a fixed window (registrations).
CREATE TABLE client_quotas (
    -- SHA-256 of the purpose and the client address.
    subject      BLOB    NOT NULL PRIMARY KEY,
    -- Unix seconds the current window started.
    window_start INTEGER NOT NULL,
    used         INTEGER NOT NULL
);
CREATE INDEX client_quotas_window ON client_quotas (window_start);
