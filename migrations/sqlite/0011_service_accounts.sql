-- Service accounts: identities of backend services, kept apart from users
-- (no password, no second factor, never a BeginLogin). They get access
-- tokens from the token endpoint, by OAuth 2.0 client credentials (same
-- schema as migrations/mysql/0011).
CREATE TABLE service_accounts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The operator's name for it (same rules as a username).
    name        TEXT    NOT NULL UNIQUE,
    -- Its OAuth 2.0 client_id: "svc_" and random characters.
    client_id   TEXT    NOT NULL UNIQUE,
    created_at  TEXT    NOT NULL,
    -- Set while disabled: no new token.
    disabled_at TEXT    NULL
);

CREATE TABLE service_account_roles (
    account_id INTEGER NOT NULL REFERENCES service_accounts (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL,
    PRIMARY KEY (account_id, role)
);

-- Client secrets, as SHA-256: a secret is 256 random bits, which no guess
-- reaches, so a slow hash would add cost and no safety. A rotated secret
-- keeps working until expires_at (the rotation's grace), then is deleted.
CREATE TABLE service_account_secrets (
    secret_hash BLOB    NOT NULL PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES service_accounts (id) ON DELETE CASCADE,
    created_at  TEXT    NOT NULL,
    -- NULL: the current secret.
    expires_at  TEXT    NULL
);
CREATE INDEX service_account_secrets_account ON service_account_secrets (account_id);
