-- Login throttling and recovery codes (same schema as migrations/sqlite/0002).

-- Failed login attempts per normalised username, known or not.
CREATE TABLE login_throttle (
    -- SHA-256 of the normalised username: unknown names are counted too,
    -- without keeping what strangers typed.
    subject      BINARY(32)  NOT NULL PRIMARY KEY,
    -- Consecutive failures, counting attempts still being evaluated.
    failures     INT         NOT NULL DEFAULT 0,
    -- Unix seconds before which no attempt is evaluated.
    locked_until BIGINT      NULL,
    updated_at   DATETIME(6) NOT NULL,
    KEY login_throttle_updated (updated_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Single-use codes that stand in for a TOTP code.
CREATE TABLE recovery_codes (
    user_id   BIGINT      NOT NULL,
    -- HMAC-SHA-256 of the code under a key derived from the master key.
    code_hash BINARY(32)  NOT NULL,
    used_at   DATETIME(6) NULL,
    PRIMARY KEY (user_id, code_hash),
    CONSTRAINT recovery_codes_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
