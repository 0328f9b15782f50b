-- Accounts an operator can run (same schema as migrations/sqlite/0007):
-- a disabled account cannot log in or refresh, and when each last logged in.
ALTER TABLE users
    ADD COLUMN disabled_at DATETIME(6) NULL,
    ADD COLUMN last_login_at DATETIME(6) NULL;
