-- Idempotency keys per caller (same schema as migrations/mysql/0005): a
-- request id names a request of the caller who sent it (the access token's
-- `sub`), so that another caller sending the same id gets a write of their
-- own instead of the first caller's answer. A new table: replicas of an
-- earlier version keep using product_requests during a rolling upgrade.
CREATE TABLE product_request_ids (
    -- The caller's `sub` (auth-service: the user id).
    caller       TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    -- SHA-256 of the method and the request body: the same id with another
    -- body from the same caller is refused.
    request_hash BLOB NOT NULL,
    -- The encoded storegate.product.v1.Product the first call returned.
    response     BLOB NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (caller, request_id)
);
CREATE INDEX product_request_ids_created ON product_request_ids (created_at);
