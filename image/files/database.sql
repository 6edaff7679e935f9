-- foobar: the application's database and its user, made once in the image's package layer (mariadbd --bootstrap).
-- The user authenticates by unix_socket: no password exists anywhere, so nothing secret is baked in.
-- Bootstrap mode starts without the grant tables; loading them makes CREATE USER and GRANT work.
FLUSH PRIVILEGES;
CREATE DATABASE IF NOT EXISTS foobar CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS `foobar`@`localhost` IDENTIFIED VIA unix_socket;
GRANT ALL PRIVILEGES ON foobar.* TO `foobar`@`localhost`;
