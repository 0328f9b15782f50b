-- Full-text search of products (same purpose as migrations/sqlite/0006): a
-- ListProducts `query` is a set of words looked up in this index instead of
-- a LIKE scan of the table (product-service/src/search.rs builds the
-- boolean-mode query). One plain DDL: safe to re-run (a duplicate key name
-- counts as done) and an ordinary schema change on Galera; InnoDB keeps the
-- index transactionally, so a committed write is searchable at once. The
-- first FULLTEXT index of a table rebuilds it (an FTS_DOC_ID column).
-- MariaDB has no ngram parser: the built-in parser indexes words of 3 to 84
-- characters (innodb_ft_min_token_size, innodb_ft_max_token_size),
-- case- and accent-insensitively under the table's utf8mb4_unicode_ci.
-- An index takes its stopword list when it is created: created without one,
-- "the" or "with" are words like any other, as they are in SQLite's FTS5
-- index, and a required one finds what has it (with the default list it
-- would match nothing). Both statements run on one connection.
SET SESSION innodb_ft_enable_stopword = OFF;
ALTER TABLE products ADD FULLTEXT KEY products_search (name, description);
