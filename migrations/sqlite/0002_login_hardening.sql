-- Login throttling and recovery codes (same schema as migrations/mysql/0002).

-- Failed login attempts per normalised username, known or not.
CREATE TABLE login_throttle (
    -- SHA-256 of the normalised username: unknown names are counted too,
    -- without keeping what strangers typed.
    subject      BLOB    NOT NULL PRIMARY KEY,
    -- Consecutive failures, counting attempts still being evaluated.
    failures     INTEGER NOT NULL DEFAULT 0,
    -- Unix seconds before which no attempt is evaluated.
    locked_until INTEGER NULL,
    updated_at   TEXT    NOT NULL
);

-- Single-use codes that stand in for a TOTP code.
CREATE TABLE recovery_codes (
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- HMAC-SHA-256 of the code under a key derived from the master key.
    code_hash BLOB    NOT NULL,
    used_at   TEXT    NULL,
    PRIMARY KEY (user_id, code_hash)
);
CREATE INDEX login_throttle_updated ON login_throttle (updated_at);
