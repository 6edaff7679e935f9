//! `foobar-agent backup` and `restore` against a real MariaDB: a backup holds the site's rows and no secret, the
//! newest `backup-keep` stay, the hook gets each one, a restore brings the rows back, and a file cut short or not of
//! ours is refused before anything changes.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::support::{self, agent_command, mariadb};

fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    found.sort();
    found
}

fn unzip(path: &Path) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[test]
fn backups_are_kept_to_a_count_shipped_by_the_hook_and_restore_the_rows() {
    let db = mariadb::shared();
    let url = db.fresh_database();
    let name = url.split('?').next().unwrap().rsplit('/').next().unwrap().to_string();
    let (code, _, stderr) = agent_command(&["migrate", "--database-url", &url]);
    assert_eq!(code, 0, "{stderr}");
    db.sql(&format!(
        "INSERT INTO `{name}`.posts (author, body) VALUES ('ada', 'first <b>post</b>'), ('bob', 'second\\npost')"
    ));

    let dir = support::temp_dir("backup");
    let (store, shipped) = (dir.join("store"), dir.join("shipped"));
    std::fs::create_dir_all(&shipped).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "backup-dir = \"{}\"\nbackup-keep = 2\nbackup-hook = [\"sh\", \"-c\", \"cp \\\"$1\\\" {}/\", \"hook\"]\n",
            store.display(),
            shipped.display()
        ),
    )
    .unwrap();
    let args = ["backup", "--config", config.to_str().unwrap(), "--database-url", &url];
    for _ in 0..3 {
        let (code, out, stderr) = agent_command(&args);
        assert_eq!(code, 0, "{stderr}");
        assert!(out.starts_with("backup ") && out.contains(".sql.gz ("), "{out}");
    }
    let kept = backups(&store);
    assert_eq!(kept.len(), 2, "the newest two are kept: {kept:?}");
    assert_eq!(backups(&shipped).len(), 3, "the hook got every backup");
    let newest = kept.last().unwrap();
    assert!(
        newest
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(&format!("foobar-{name}-")),
        "{newest:?}"
    );
    let dump = unzip(newest);
    assert!(
        dump.starts_with("-- foobar-agent backup of database"),
        "{}",
        &dump[..200]
    );
    assert!(dump.contains("first <b>post</b>") && dump.contains("_sqlx_migrations"));
    for secret in ["CREATE USER", "GRANT", "IDENTIFIED", "mysql.user"] {
        assert!(!dump.contains(secret), "the backup holds `{secret}`");
    }

    // Lost rows come back from the newest backup.
    db.sql(&format!(
        "DELETE FROM `{name}`.posts; DROP TABLE `{name}`._sqlx_migrations"
    ));
    let (code, out, stderr) = agent_command(&["restore", "--database-url", &url, newest.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("restored"), "{out}");
    let rows = db.sql(&format!("SELECT author, body FROM `{name}`.posts ORDER BY id"));
    assert_eq!(rows, "ada\tfirst <b>post</b>\nbob\tsecond\\npost\n");
    let (code, _, stderr) = agent_command(&["migrate", "--database-url", &url]);
    assert_eq!(code, 0, "the restored schema is current: {stderr}");

    // A file cut short, and one that is not ours, are refused before anything changes.
    db.sql(&format!(
        "INSERT INTO `{name}`.posts (author, body) VALUES ('cy', 'after the restore')"
    ));
    let bytes = std::fs::read(newest).unwrap();
    let cut = dir.join("cut.sql.gz");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (code, _, stderr) = agent_command(&["restore", "--database-url", &url, cut.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("is truncated") && stderr.contains("nothing was restored"),
        "{stderr}"
    );
    let other = dir.join("other.sql.gz");
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&other).unwrap(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"DROP TABLE posts;\n-- Dump completed\n").unwrap();
    gz.finish().unwrap();
    let (code, _, stderr) = agent_command(&["restore", "--database-url", &url, other.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is not a backup of foobar-agent"), "{stderr}");
    let plain = dir.join("plain.sql");
    std::fs::write(&plain, "DROP TABLE posts;\n").unwrap();
    let (code, _, stderr) = agent_command(&["restore", "--database-url", &url, plain.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is not a backup of foobar-agent"), "{stderr}");
    let count = db.sql(&format!("SELECT COUNT(*) FROM `{name}`.posts"));
    assert_eq!(count.trim(), "3", "nothing changed");
}

#[test]
fn a_failed_backup_leaves_no_file_and_says_why() {
    let dir = support::temp_dir("backup-fail");
    let url = format!(
        "mysql://root@localhost/nowhere?socket={}",
        dir.join("no-such.sock").display()
    );
    let (code, _, stderr) = agent_command(&[
        "backup",
        "--dir",
        dir.join("store").to_str().unwrap(),
        "--database-url",
        &url,
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("mariadb-dump failed"), "{stderr}");
    assert!(backups(&dir.join("store")).is_empty(), "no half-written backup");
}
