-- The full-text index's changes of a group commit, written once per group
-- (SQLite only: MySQL's FULLTEXT is InnoDB's own and has no triggers).
--
-- FTS5 writes its pending changes out as a new segment of the index at every
-- SAVEPOINT of a transaction that has changed it, and a group commit
-- (src/sqlite_writes.rs) runs each write in a savepoint of its own: every
-- create became a segment, merged again as the index went on. So while a
-- group's transaction is open (products_search_deferral.deferred = 1, set by
-- the group inside its transaction, never committed), the triggers queue the
-- index's changes, and the group writes the queue to the index once, before
-- its COMMIT: in the same transaction, so the index still changes with every
-- write's commit. Any other writer (a tool, the sqlite3 shell) finds 0 and
-- changes the index directly, as before; so does every writer if the flag's
-- row is ever missing (IS NOT 1), so that the index never silently stops.
CREATE TABLE products_search_deferral (
    deferred INTEGER NOT NULL
);
INSERT INTO products_search_deferral (deferred) VALUES (0);

-- In the order of the changes: 'delete' takes a product's old words out,
-- NULL adds its words (the values of products_search's command column). The
-- group writes them by product, each product's in order: FTS5 starts a new
-- segment whenever a write's rowid is lower than the one before.
CREATE TABLE products_search_queue (
    seq         INTEGER PRIMARY KEY,
    command     TEXT,
    product_id  INTEGER NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL
);

DROP TRIGGER products_search_insert;
DROP TRIGGER products_search_delete;
DROP TRIGGER products_search_update;

-- Each trigger is one statement, as in 0006.
CREATE TRIGGER products_search_insert AFTER INSERT ON products
WHEN (SELECT deferred FROM products_search_deferral) IS NOT 1 BEGIN
    INSERT INTO products_search (rowid, name, description) VALUES (new.id, new.name, new.description); END;

CREATE TRIGGER products_search_insert_queued AFTER INSERT ON products
WHEN (SELECT deferred FROM products_search_deferral) = 1 BEGIN
    INSERT INTO products_search_queue (command, product_id, name, description)
    VALUES (NULL, new.id, new.name, new.description); END;

CREATE TRIGGER products_search_delete AFTER DELETE ON products
WHEN (SELECT deferred FROM products_search_deferral) IS NOT 1 BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.id, old.name, old.description); END;

CREATE TRIGGER products_search_delete_queued AFTER DELETE ON products
WHEN (SELECT deferred FROM products_search_deferral) = 1 BEGIN
    INSERT INTO products_search_queue (command, product_id, name, description)
    VALUES ('delete', old.id, old.name, old.description); END;

-- Stock and price changes leave the index alone.
CREATE TRIGGER products_search_update AFTER UPDATE OF name, description ON products
WHEN (SELECT deferred FROM products_search_deferral) IS NOT 1 BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.id, old.name, old.description)
    ; INSERT INTO products_search (rowid, name, description) VALUES (new.id, new.name, new.description); END;

CREATE TRIGGER products_search_update_queued AFTER UPDATE OF name, description ON products
WHEN (SELECT deferred FROM products_search_deferral) = 1 BEGIN
    INSERT INTO products_search_queue (command, product_id, name, description)
    VALUES ('delete', old.id, old.name, old.description)
    ; INSERT INTO products_search_queue (command, product_id, name, description)
    VALUES (NULL, new.id, new.name, new.description); END;
