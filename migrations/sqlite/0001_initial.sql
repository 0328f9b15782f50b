-- storegate schema, SQLite variant. migrations/mysql/ holds the same schema
-- for MySQL / MariaDB; change both together.
-- Times are UTC text (RFC 3339), prices exact fixed-width decimal text.

CREATE TABLE users (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    username          TEXT    NOT NULL UNIQUE,
    password_hash     TEXT    NOT NULL,
    -- AES-256-GCM(nonce || ciphertext || tag) of the 20-byte TOTP secret,
    -- with the user id as associated data.
    totp_secret       BLOB    NOT NULL,
    totp_confirmed_at TEXT    NULL,
    -- The last accepted TOTP time step: a step is accepted at most once.
    totp_last_step    INTEGER NULL,
    created_at        TEXT    NOT NULL
);

CREATE TABLE user_roles (
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role    TEXT    NOT NULL,
    PRIMARY KEY (user_id, role)
);

CREATE TABLE login_tickets (
    -- SHA-256 of the ticket; the ticket itself is never stored.
    ticket_hash  BLOB    NOT NULL PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    failed_codes INTEGER NOT NULL DEFAULT 0,
    expires_at   TEXT    NOT NULL,
    created_at   TEXT    NOT NULL
);
CREATE INDEX login_tickets_expires ON login_tickets (expires_at);

CREATE TABLE refresh_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash  BLOB    NOT NULL UNIQUE,
    -- Every token rotated out of one login shares the family.
    family      BLOB    NOT NULL,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at  TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    rotated_at  TEXT    NULL,
    revoked_at  TEXT    NULL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);

CREATE TABLE signing_keys (
    kid          TEXT NOT NULL PRIMARY KEY,
    public_key   BLOB NOT NULL,
    -- AES-256-GCM of the PKCS#8 private key, with the kid as associated data.
    private_key  BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    -- Published from created_at; used for signing from active_at.
    active_at    TEXT NOT NULL,
    -- No longer used for signing; published until its tokens have expired.
    retired_at   TEXT NULL
);

CREATE TABLE products (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL,
    description  TEXT    NOT NULL,
    -- Exact decimal text, zero-padded to a fixed width ("0000000999.99") so
    -- that text order is numeric order. Never a REAL.
    price        TEXT    NOT NULL CHECK (length(price) = 13),
    stock        INTEGER NOT NULL CHECK (stock >= 0),
    -- Bumped on every write; the etag is derived from it.
    version      INTEGER NOT NULL,
    -- User ids from the access tokens of the writers.
    created_by   INTEGER NULL,
    updated_by   INTEGER NULL,
    create_time  TEXT    NOT NULL,
    update_time  TEXT    NOT NULL
);
-- Keyset pagination in each supported order.
CREATE INDEX products_name ON products (name, id);
CREATE INDEX products_price ON products (price, id);
CREATE INDEX products_create_time ON products (create_time, id);

-- Idempotency keys of product writes (CreateProduct, AdjustStock): a retry
-- with the same request id gets the recorded answer instead of a second write.
CREATE TABLE product_requests (
    request_id   TEXT NOT NULL PRIMARY KEY,
    -- SHA-256 of the method and the request body: the same id with another
    -- body is refused.
    request_hash BLOB NOT NULL,
    -- The encoded storegate.product.v1.Product the first call returned.
    response     BLOB NULL,
    created_at   TEXT NOT NULL
);
CREATE INDEX product_requests_created ON product_requests (created_at);
