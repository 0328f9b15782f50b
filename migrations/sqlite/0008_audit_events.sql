-- The audit trail of security events (same schema as
-- migrations/mysql/0008): who did what to which account, and when.
-- Rows are never updated; auth-service deletes those older than
-- AUDIT_RETENTION_DAYS.
CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at TEXT    NOT NULL,
    -- What happened: `login.password_rejected`, `account.disabled`, ...
    event       TEXT    NOT NULL,
    -- The account it happened to (no foreign key: the history of a deleted
    -- account stays), and its name then.
    user_id     INTEGER NULL,
    username    TEXT    NULL,
    -- Who: `self` (the account's owner), `operator` (an admin command on
    -- the database), `admin:<user id>` (the admin API), `system`.
    actor       TEXT    NOT NULL,
    -- The caller's address, for calls.
    client_addr TEXT    NULL,
    -- A role's name, a key id, a count: never a secret.
    detail      TEXT    NULL
);
CREATE INDEX audit_events_time ON audit_events (occurred_at);
CREATE INDEX audit_events_user ON audit_events (user_id, id);
