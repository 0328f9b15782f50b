-- Full-text search of products (same purpose as migrations/mysql/0006): an
-- FTS5 index over products (name, description) with external content (the
-- text stays in products only), kept in step by triggers, so every write
-- changes the index in its own transaction. Words are cut like InnoDB's
-- parser does (letters and digits, and `_` inside a word), case- and
-- accent-insensitively (remove_diacritics 2), so both backends find the
-- same words.
CREATE VIRTUAL TABLE products_search USING fts5(
    name, description,
    content = 'products', content_rowid = 'id',
    tokenize = "unicode61 remove_diacritics 2 tokenchars '_'"
);

-- The catalogue as it is now.
INSERT INTO products_search (rowid, name, description) SELECT id, name, description FROM products;

-- Each trigger is one statement: its inner statements do not end a line,
-- so that migrations split at line-ending semicolons keep it whole.
CREATE TRIGGER products_search_insert AFTER INSERT ON products BEGIN
    INSERT INTO products_search (rowid, name, description) VALUES (new.id, new.name, new.description); END;

CREATE TRIGGER products_search_delete AFTER DELETE ON products BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.id, old.name, old.description); END;

-- Stock and price changes leave the index alone.
CREATE TRIGGER products_search_update AFTER UPDATE OF name, description ON products BEGIN
    INSERT INTO products_search (products_search, rowid, name, description)
    VALUES ('delete', old.id, old.name, old.description)
    ; INSERT INTO products_search (rowid, name, description) VALUES (new.id, new.name, new.description); END;
