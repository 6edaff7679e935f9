-- Posts of the built-in app. The list query pages newest-first by id (`WHERE id < ? ORDER BY id DESC`),
-- which the primary key serves directly; ids only grow, so id order is creation order.
CREATE TABLE posts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    author VARCHAR(100) NOT NULL,
    body TEXT NOT NULL,
    created_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
