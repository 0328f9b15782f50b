-- The audit trail of security events (same schema as
-- migrations/sqlite/0008): who did what to which account, and when.
-- Rows are never updated; auth-service deletes those older than
-- AUDIT_RETENTION_DAYS.
CREATE TABLE audit_events (
    id          BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    occurred_at DATETIME(6)  NOT NULL,
    -- What happened: `login.password_rejected`, `account.disabled`, ...
    event       VARCHAR(40)  NOT NULL,
    -- The account it happened to (no foreign key: the history of a deleted
    -- account stays), and its name then.
    user_id     BIGINT       NULL,
    username    VARCHAR(64)  NULL,
    -- Who: `self` (the account's owner), `operator` (an admin command on
    -- the database), `admin:<user id>` (the admin API), `system`.
    actor       VARCHAR(40)  NOT NULL,
    -- The caller's address, for calls.
    client_addr VARCHAR(64)  NULL,
    -- A role's name, a key id, a count: never a secret.
    detail      VARCHAR(200) NULL,
    KEY audit_events_time (occurred_at),
    KEY audit_events_user (user_id, id)
) ENGINE=InnoDB;
