-- Accounts an operator can run (same schema as migrations/mysql/0007):
-- a disabled account cannot log in or refresh, and when each last logged in.
ALTER TABLE users ADD COLUMN disabled_at TEXT NULL;
ALTER TABLE users ADD COLUMN last_login_at TEXT NULL;
