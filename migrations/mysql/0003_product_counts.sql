-- The number of products, kept beside the table so that a ListProducts page
-- reports total_size without a COUNT(*) scan (same schema as migrations/sqlite/0003).
-- Spread over 16 rows by id % 16 so that on MySQL concurrent creates and deletes
-- update different rows instead of queueing on one row lock; the total is the sum.
CREATE TABLE product_counts (
    shard    TINYINT NOT NULL PRIMARY KEY,
    products BIGINT NOT NULL
) ENGINE=InnoDB;

-- Start from what the table holds now.
INSERT INTO product_counts (shard, products) SELECT 0, COUNT(*) FROM products WHERE id % 16 = 0;
INSERT INTO product_counts (shard, products) SELECT 1, COUNT(*) FROM products WHERE id % 16 = 1;
INSERT INTO product_counts (shard, products) SELECT 2, COUNT(*) FROM products WHERE id % 16 = 2;
INSERT INTO product_counts (shard, products) SELECT 3, COUNT(*) FROM products WHERE id % 16 = 3;
INSERT INTO product_counts (shard, products) SELECT 4, COUNT(*) FROM products WHERE id % 16 = 4;
INSERT INTO product_counts (shard, products) SELECT 5, COUNT(*) FROM products WHERE id % 16 = 5;
INSERT INTO product_counts (shard, products) SELECT 6, COUNT(*) FROM products WHERE id % 16 = 6;
INSERT INTO product_counts (shard, products) SELECT 7, COUNT(*) FROM products WHERE id % 16 = 7;
INSERT INTO product_counts (shard, products) SELECT 8, COUNT(*) FROM products WHERE id % 16 = 8;
INSERT INTO product_counts (shard, products) SELECT 9, COUNT(*) FROM products WHERE id % 16 = 9;
INSERT INTO product_counts (shard, products) SELECT 10, COUNT(*) FROM products WHERE id % 16 = 10;
INSERT INTO product_counts (shard, products) SELECT 11, COUNT(*) FROM products WHERE id % 16 = 11;
INSERT INTO product_counts (shard, products) SELECT 12, COUNT(*) FROM products WHERE id % 16 = 12;
INSERT INTO product_counts (shard, products) SELECT 13, COUNT(*) FROM products WHERE id % 16 = 13;
INSERT INTO product_counts (shard, products) SELECT 14, COUNT(*) FROM products WHERE id % 16 = 14;
INSERT INTO product_counts (shard, products) SELECT 15, COUNT(*) FROM products WHERE id % 16 = 15;
