-- Service accounts: identities of backend services, kept apart from users
-- (no password, no second factor, never a BeginLogin). They get access
-- tokens from the token endpoint, by OAuth 2.0 client credentials (same
-- schema as migrations/sqlite/0011).
CREATE TABLE service_accounts (
    id          BIGINT      NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- The operator's name for it (same rules as a username).
    name        VARCHAR(64) NOT NULL,
    -- Its OAuth 2.0 client_id: "svc_" and random characters.
    client_id   VARCHAR(64) NOT NULL,
    created_at  DATETIME(6) NOT NULL,
    -- Set while disabled: no new token.
    disabled_at DATETIME(6) NULL,
    UNIQUE KEY service_accounts_name (name),
    UNIQUE KEY service_accounts_client_id (client_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE service_account_roles (
    account_id BIGINT      NOT NULL,
    role       VARCHAR(32) NOT NULL,
    PRIMARY KEY (account_id, role),
    CONSTRAINT service_account_roles_account FOREIGN KEY (account_id) REFERENCES service_accounts (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Client secrets, as SHA-256: a secret is 256 random bits, which no guess
-- reaches, so a slow hash would add cost and no safety. A rotated secret
-- keeps working until expires_at (the rotation's grace), then is deleted.
CREATE TABLE service_account_secrets (
    secret_hash BINARY(32)  NOT NULL PRIMARY KEY,
    account_id  BIGINT      NOT NULL,
    created_at  DATETIME(6) NOT NULL,
    -- NULL: the current secret.
    expires_at  DATETIME(6) NULL,
    KEY service_account_secrets_account (account_id),
    CONSTRAINT service_account_secrets_account FOREIGN KEY (account_id) REFERENCES service_accounts (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
