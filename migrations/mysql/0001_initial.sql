-- storegate schema, MySQL / MariaDB variant. migrations/sqlite/ holds the same
-- schema for SQLite; change both together.
-- Text columns use utf8mb4_unicode_ci: a _bin collation marks result columns
-- BINARY, which clients then refuse to read as text. Every value compared by
-- equality here is case-normalised or case-insensitive by nature.

CREATE TABLE users (
    id                BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username          VARCHAR(64)  NOT NULL,
    password_hash     VARCHAR(255) NOT NULL,
    -- AES-256-GCM(nonce || ciphertext || tag) of the 20-byte TOTP secret,
    -- with the user id as associated data.
    totp_secret       VARBINARY(128) NOT NULL,
    totp_confirmed_at DATETIME(6)  NULL,
    -- The last accepted TOTP time step: a step is accepted at most once.
    totp_last_step    BIGINT       NULL,
    created_at        DATETIME(6)  NOT NULL,
    UNIQUE KEY users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE user_roles (
    user_id BIGINT      NOT NULL,
    role    VARCHAR(32) NOT NULL,
    PRIMARY KEY (user_id, role),
    CONSTRAINT user_roles_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE login_tickets (
    -- SHA-256 of the ticket; the ticket itself is never stored.
    ticket_hash  BINARY(32)  NOT NULL PRIMARY KEY,
    user_id      BIGINT      NOT NULL,
    failed_codes INT         NOT NULL DEFAULT 0,
    expires_at   DATETIME(6) NOT NULL,
    created_at   DATETIME(6) NOT NULL,
    KEY login_tickets_expires (expires_at),
    CONSTRAINT login_tickets_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE refresh_tokens (
    id          BIGINT      NOT NULL AUTO_INCREMENT PRIMARY KEY,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash  BINARY(32)  NOT NULL,
    -- Every token rotated out of one login shares the family.
    family      BINARY(16)  NOT NULL,
    user_id     BIGINT      NOT NULL,
    expires_at  DATETIME(6) NOT NULL,
    created_at  DATETIME(6) NOT NULL,
    rotated_at  DATETIME(6) NULL,
    revoked_at  DATETIME(6) NULL,
    UNIQUE KEY refresh_tokens_hash (token_hash),
    KEY refresh_tokens_family (family),
    CONSTRAINT refresh_tokens_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE signing_keys (
    kid          VARCHAR(64)    NOT NULL PRIMARY KEY,
    public_key   VARBINARY(32)  NOT NULL,
    -- AES-256-GCM of the PKCS#8 private key, with the kid as associated data.
    private_key  VARBINARY(256) NOT NULL,
    created_at   DATETIME(6)    NOT NULL,
    -- Published from created_at; used for signing from active_at.
    active_at    DATETIME(6)    NOT NULL,
    -- No longer used for signing; published until its tokens have expired.
    retired_at   DATETIME(6)    NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE products (
    id          BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name        VARCHAR(200)  NOT NULL,
    description TEXT          NOT NULL,
    price       DECIMAL(12,2) NOT NULL,
    stock       BIGINT        NOT NULL,
    -- Bumped on every write; the etag is derived from it.
    version     BIGINT        NOT NULL,
    -- User ids from the access tokens of the writers.
    created_by  BIGINT        NULL,
    updated_by  BIGINT        NULL,
    create_time DATETIME(6)   NOT NULL,
    update_time DATETIME(6)   NOT NULL,
    -- Keyset pagination in each supported order.
    KEY products_name (name, id),
    KEY products_price (price, id),
    KEY products_create_time (create_time, id),
    CONSTRAINT products_price_not_negative CHECK (price >= 0),
    CONSTRAINT products_stock_not_negative CHECK (stock >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Idempotency keys of product writes (CreateProduct, AdjustStock): a retry
-- with the same request id gets the recorded answer instead of a second write.
CREATE TABLE product_requests (
    request_id   VARCHAR(64) NOT NULL PRIMARY KEY,
    -- SHA-256 of the method and the request body: the same id with another
    -- body is refused.
    request_hash BINARY(32)  NOT NULL,
    -- The encoded storegate.product.v1.Product the first call returned.
    response     BLOB        NULL,
    created_at   DATETIME(6) NOT NULL,
    KEY product_requests_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
