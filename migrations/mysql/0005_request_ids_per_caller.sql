-- Idempotency keys per caller (same schema as migrations/sqlite/0005): a
-- request id names a request of the caller who sent it (the access token's
-- `sub`), so that another caller sending the same id gets a write of their
-- own instead of the first caller's answer.
-- A new table rather than a new key on product_requests: replicas of an
-- earlier version keep using that one during a rolling upgrade (and its
-- rows expire), so neither version reads the other's keys, and the change is
-- one plain CREATE (safe to re-run, and an ordinary DDL on Galera; the
-- primary key Galera needs for certification is there from the start).
CREATE TABLE product_request_ids (
    -- The caller's `sub` (auth-service: the user id).
    caller       VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    request_id   VARCHAR(64) NOT NULL,
    -- SHA-256 of the method and the request body: the same id with another
    -- body from the same caller is refused.
    request_hash BINARY(32)  NOT NULL,
    -- The encoded storegate.product.v1.Product the first call returned.
    response     BLOB        NULL,
    created_at   DATETIME(6) NOT NULL,
    PRIMARY KEY (caller, request_id),
    KEY product_request_ids_created (created_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
