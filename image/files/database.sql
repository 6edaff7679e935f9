-- foobar: the application's database and its users, made with the data directory at first boot
-- (/usr/lib/foobar/datadir: mariadb-install-db --extra-file).
-- The user authenticates by unix_socket: no password exists anywhere, so nothing secret is baked in. The
-- `mysql_native_password USING 'invalid'` alternative (the form Debian gives root) can never match a password; it is
-- there because clients without authentication plugin support (Node.js's mysql module) only get as far as the
-- unix_socket check when the server starts the exchange with native password authentication.
-- Bootstrap mode may start without the grant tables loaded; loading them makes CREATE USER and GRANT work.
FLUSH PRIVILEGES;
CREATE DATABASE IF NOT EXISTS foobar CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER IF NOT EXISTS `foobar`@`localhost` IDENTIFIED VIA mysql_native_password USING 'invalid' OR unix_socket;
GRANT ALL PRIVILEGES ON foobar.* TO `foobar`@`localhost`;
-- The site's own app server (`[app]`, foobar-app.service) connects as its own user, by unix_socket as the system user
-- of the same name, with rights on the site's schema only. Without an [app] no such system user exists, so nobody
-- can connect as it.
CREATE USER IF NOT EXISTS `foobar-app`@`localhost` IDENTIFIED VIA mysql_native_password USING 'invalid' OR unix_socket;
GRANT ALL PRIVILEGES ON foobar.* TO `foobar-app`@`localhost`;
