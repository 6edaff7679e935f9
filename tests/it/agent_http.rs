//! The agent's HTTP surface, driven through `app().oneshot(...)` against a real, throwaway MariaDB.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use foobar_agent::config::Config;
use foobar_agent::db::migrate;
use foobar_agent::state::MigrationStatus;
use foobar_agent::AppState;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::support::mariadb;

/// What `app()` answered, as a client sees it. The read cache's tests use it too.
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `req` to the app and reads the whole answer.
pub async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// An app on a fresh database with migrations applied, as `serve` has it once ready.
async fn ready_app(first_boot_marker: Option<std::path::PathBuf>) -> (Router, AppState) {
    ready_app_at(mariadb::shared().fresh_database(), first_boot_marker).await
}

/// `ready_app` on the database at `database_url`.
async fn ready_app_at(database_url: String, first_boot_marker: Option<std::path::PathBuf>) -> (Router, AppState) {
    let config = Config {
        database_url,
        ..Config::default()
    };
    let pool = foobar_agent::db::pool(&config).unwrap();
    let migrator = migrate::load(None).await.unwrap();
    let applied = migrate::apply(&pool, &migrator, Duration::from_secs(10)).await.unwrap();
    assert_eq!(applied.newly_applied, 1, "a fresh database gets every migration");
    let state = AppState::new(pool, first_boot_marker);
    state.set_migration_status(MigrationStatus::Applied {
        version: applied.version,
        newly_applied: applied.newly_applied,
        unknown: applied.unknown,
    });
    (foobar_agent::app(state.clone()), state)
}

async fn call(app: &Router, method: &str, path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    send(app, req.body(body.into()).unwrap()).await
}

async fn get(app: &Router, path: &str) -> Reply {
    call(app, "GET", path, None, Body::empty()).await
}

async fn post_json(app: &Router, body: &Value) -> Reply {
    call(app, "POST", "/api/posts", Some("application/json"), body.to_string()).await
}

#[tokio::test]
async fn created_post_is_returned_listed_and_fetchable() {
    let (app, _) = ready_app(None).await;
    let created = post_json(&app, &json!({"author": "ana", "body": "hello"})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let post = created.json();
    assert_eq!(post["author"], "ana");
    assert_eq!(post["body"], "hello");
    let id = post["id"].as_u64().expect("numeric id");
    assert!(post["created_at"].as_str().unwrap().ends_with('Z'), "{post}");
    assert_eq!(created.headers[header::LOCATION], format!("/api/posts/{id}").as_str());

    let fetched = get(&app, &format!("/api/posts/{id}")).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json(), post);

    let list = get(&app, "/api/posts").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(list.json(), json!([post]));
}

#[tokio::test]
async fn list_is_newest_first_and_pages_with_limit_and_before() {
    let (app, _) = ready_app(None).await;
    for i in 1..=5 {
        let r = post_json(&app, &json!({"author": "pager", "body": format!("post {i}")})).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let first = get(&app, "/api/posts?limit=2").await.json();
    let bodies: Vec<&str> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["post 5", "post 4"]);
    let last_id = first[1]["id"].as_u64().unwrap();
    let next = get(&app, &format!("/api/posts?limit=2&before={last_id}")).await.json();
    let bodies: Vec<&str> = next
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["post 3", "post 2"]);
    let all = get(&app, "/api/posts").await.json();
    assert_eq!(all.as_array().unwrap().len(), 5, "default limit covers all five");
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_without_internals() {
    let (app, _) = ready_app(None).await;
    let long_author = "a".repeat(101);
    let long_body = "b".repeat(10_001);
    let cases: Vec<(&str, &str, Option<&str>, String, StatusCode)> = vec![
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            "{not json".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/posts",
            Some("text/plain"),
            r#"{"author":"a","body":"b"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            "/api/posts",
            None,
            r#"{"author":"a","body":"b"}"#.into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            r#"{"author":"a"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            r#"{"author":"","body":"b"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            r#"{"author":"a","body":"   "}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            r#"{"author":5,"body":"b"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            json!({"author": long_author, "body": "b"}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            json!({"author": "a", "body": long_body}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/api/posts",
            Some("application/json"),
            "x".repeat(65 * 1024),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("GET", "/api/posts/abc", None, String::new(), StatusCode::BAD_REQUEST),
        ("GET", "/api/posts/-1", None, String::new(), StatusCode::BAD_REQUEST),
        ("GET", "/api/posts/99999999", None, String::new(), StatusCode::NOT_FOUND),
        (
            "GET",
            "/api/posts/99999999999999999999999",
            None,
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/posts?limit=0",
            None,
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/posts?limit=101",
            None,
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/posts?limit=ten",
            None,
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/posts?before=x",
            None,
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/posts",
            Some("application/json"),
            "{}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "POST",
            "/posts",
            Some("application/x-www-form-urlencoded"),
            "author=a".into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "DELETE",
            "/api/posts",
            None,
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        ("GET", "/no/such/path", None, String::new(), StatusCode::NOT_FOUND),
    ];
    for (method, path, ct, body, expected) in cases {
        let shown = body.chars().take(40).collect::<String>();
        let r = call(&app, method, path, ct, body).await;
        assert_eq!(r.status, expected, "{method} {path} {ct:?} {shown}: {}", r.body);
        let error = r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", r.body))
            .to_string();
        assert!(!error.is_empty());
        for internal in ["SELECT", "INSERT", "sqlx", "/src/", "mysql", "panicked"] {
            assert!(
                !error.contains(internal),
                "{method} {path}: error leaks `{internal}`: {error}"
            );
        }
    }
    assert_eq!(
        get(&app, "/api/posts").await.json(),
        json!([]),
        "nothing was stored by bad requests"
    );
}

#[tokio::test]
async fn any_text_is_stored_exactly_and_escaped_in_html() {
    let (app, _) = ready_app(None).await;
    let tricky = "<script>alert('x')</script> \"quoted\" '; DROP TABLE posts; -- ünïcödé 日本語 🦀\n\ttabs";
    let author = "O'Brien <b>";
    let created = post_json(&app, &json!({"author": author, "body": tricky})).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.json()["id"].as_u64().unwrap();
    let fetched = get(&app, &format!("/api/posts/{id}")).await.json();
    assert_eq!(fetched["body"], tricky);
    assert_eq!(fetched["author"], author);

    let page = get(&app, "/posts").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(!page.body.contains("<script>alert"), "raw script tag in page");
    assert!(
        page.body.contains("&lt;script&gt;alert("),
        "escaped text missing: {}",
        page.body
    );
    assert!(page.body.contains("日本語 🦀"));
    assert!(page.body.contains("O&#x27;Brien &lt;b&gt;"), "{}", page.body);
}

#[tokio::test]
async fn the_html_form_posts_and_redirects_back_with_303() {
    let (app, _) = ready_app(None).await;
    let empty = get(&app, "/posts").await;
    assert!(empty.body.contains("<form method=\"post\" action=\"/posts\""));
    assert!(empty.body.contains("No posts yet"));
    let r = call(
        &app,
        "POST",
        "/posts",
        Some("application/x-www-form-urlencoded"),
        "author=Zo%C3%AB&body=from+the+form%21",
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.headers[header::LOCATION], "/posts");
    let page = get(&app, "/posts").await;
    assert!(page.body.contains("from the form!"), "{}", page.body);
    assert!(page.body.contains("Zoë"));
    assert_eq!(get(&app, "/api/posts").await.json()[0]["body"], "from the form!");
}

#[tokio::test]
async fn health_endpoints_report_each_component() {
    let marker = crate::support::temp_dir("marker").join("first-boot.done");
    let (app, _) = ready_app(Some(marker.clone())).await;

    assert_eq!(get(&app, "/livez").await.status, StatusCode::OK);
    let not_ready = get(&app, "/readyz").await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(not_ready.body.contains("first boot not complete"), "{}", not_ready.body);
    let health = get(&app, "/healthz").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.headers[header::CONTENT_TYPE], "application/health+json");
    let doc = health.json();
    assert_eq!(doc["status"], "fail");
    assert_eq!(doc["checks"]["first-boot:marker"][0]["status"], "fail");
    assert_eq!(doc["checks"]["database:connection"][0]["status"], "pass");

    std::fs::write(&marker, b"").unwrap();
    // A readiness result answers for up to a second (HEALTH_TTL): the marker shows within that.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while get(&app, "/readyz").await.status != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the marker was not seen within the health interval"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let doc = get(&app, "/healthz").await.json();
    assert_eq!(doc["status"], "pass");
    // The build: the package version and, in a git checkout, the commit it was built from.
    assert_eq!(doc["version"], foobar_agent::VERSION);
    let head = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let expected = match head {
        Some(commit) => format!("{}+{commit}", env!("CARGO_PKG_VERSION")),
        None => env!("CARGO_PKG_VERSION").to_string(),
    };
    assert_eq!(foobar_agent::VERSION, expected);
    assert_eq!(doc["checks"]["migrations:version"][0]["status"], "pass");
    assert_eq!(doc["checks"]["migrations:version"][0]["observedValue"], 1);
    for component in ["database:connection", "migrations:version", "first-boot:marker"] {
        assert_eq!(doc["checks"][component][0]["status"], "pass", "{component}: {doc}");
    }
}

async fn get_with(app: &Router, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method("GET").uri(path);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(app, req.body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn a_proxied_client_gets_statuses_and_the_version_only_unless_nginx_vouches_for_it() {
    let marker = crate::support::temp_dir("marker-public").join("first-boot.done");
    let marker_dir = marker.parent().unwrap().display().to_string();
    let (app, _) = ready_app(Some(marker.clone())).await;
    let outside: &[&[(&str, &str)]] = &[
        &[("x-forwarded-for", "203.0.113.9")],
        &[("x-forwarded-for", "203.0.113.9"), ("x-foobar-health-detail", "0")],
    ];
    for headers in outside {
        let ready = get_with(&app, "/readyz", headers).await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.json(), json!({"status": "not ready"}), "{headers:?}");
        let health = get_with(&app, "/healthz", headers).await;
        assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
        let doc = health.json();
        assert_eq!(doc["version"], foobar_agent::VERSION);
        assert_eq!(
            doc["checks"]["first-boot:marker"][0],
            json!({"status": "fail"}),
            "{doc}"
        );
        assert_eq!(
            doc["checks"]["migrations:version"][0],
            json!({"status": "pass"}),
            "{doc}"
        );
        assert!(!health.body.contains(&marker_dir), "a path leaked: {}", health.body);
        assert!(!health.body.contains("output"), "{}", health.body);
    }
    // nginx says the client is on the machine: everything.
    let headers = [("x-forwarded-for", "127.0.0.1"), ("x-foobar-health-detail", "1")];
    let ready = get_with(&app, "/readyz", &headers).await;
    assert!(ready.body.contains("first boot not complete"), "{}", ready.body);
    let health = get_with(&app, "/healthz", &headers).await;
    assert!(health.body.contains(&marker_dir), "{}", health.body);
    assert_eq!(health.json()["checks"]["migrations:version"][0]["observedValue"], 1);
}

#[tokio::test]
async fn a_flood_of_health_requests_runs_one_readiness_check_per_interval() {
    let (app, _) = ready_app(None).await;
    let metric = |body: &str, name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    let before = get(&app, "/metrics").await.body;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let app = app.clone();
        let path = if i % 2 == 0 { "/readyz" } else { "/healthz" };
        tasks.push(tokio::spawn(async move { get(&app, path).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let took = started.elapsed();
    let after = get(&app, "/metrics").await.body;
    let checks = metric(&after, "foobar_readiness_checks_total") - metric(&before, "foobar_readiness_checks_total");
    // One check per started second of the flood, and not one per request.
    let allowed = took.as_secs() + 1;
    assert!(
        checks <= allowed,
        "{checks} readiness checks for 400 requests in {took:?}"
    );
    assert!(checks >= 1);
    let in_use = |body: &str| {
        metric(body, "foobar_db_pool_connections{state=\"idle\"}")
            + metric(body, "foobar_db_pool_connections{state=\"in_use\"}")
    };
    // One check takes one connection at most (without the interval, 400 at once would open the pool's 16).
    assert!(
        in_use(&after) <= in_use(&before) + 1,
        "the flood opened connections: {before}\n{after}"
    );
}

#[tokio::test]
async fn a_query_held_up_by_a_lock_answers_503_with_retry_after_within_the_query_timeout() {
    use sqlx::Connection as _;
    let url = mariadb::shared().fresh_database();
    let config = Config {
        database_url: url.clone(),
        query_timeout: 1,
        ..Config::default()
    };
    let pool = foobar_agent::db::pool(&config).unwrap();
    let migrator = migrate::load(None).await.unwrap();
    migrate::apply(&pool, &migrator, Duration::from_secs(10)).await.unwrap();
    let state = AppState::new(pool, None);
    state.set_migration_status(MigrationStatus::Applied {
        version: 1,
        newly_applied: 1,
        unknown: Vec::new(),
    });
    let app = foobar_agent::app(state);

    // Another session holds the table: every query of the agent waits on it.
    let mut other = sqlx::MySqlConnection::connect(&url).await.unwrap();
    sqlx::query("LOCK TABLES posts WRITE")
        .execute(&mut other)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        post_json(&app, &json!({"author": "a", "body": "held up"})),
    )
    .await
    .expect("the request waited on the lock without a time limit");
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.headers[header::RETRY_AFTER], "2");
    assert_eq!(r.json(), json!({"error": "database unavailable, try again shortly"}));
    assert!(
        took < Duration::from_secs(5),
        "the query was not cut at its time limit: {took:?}"
    );
    let r = get(&app, "/api/posts").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);

    sqlx::query("UNLOCK TABLES").execute(&mut other).await.unwrap();
    let r = post_json(&app, &json!({"author": "a", "body": "after"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

/// A tmpfs of `mib` MiB mounted on a fresh directory (the tests run as root, as CI does); unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = crate::support::temp_dir("small-disk");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_nearly_full_disk_refuses_writes_with_507_keeps_reads_and_recovers_once_space_is_freed() {
    let disk = SmallDisk::mount(16);
    let (app, state) = ready_app(None).await;
    state
        .disk
        .set(foobar_agent::state::DiskGuard {
            path: disk.0.clone(),
            min_free: 8 << 20,
        })
        .unwrap();
    assert_eq!(
        post_json(&app, &json!({"author": "a", "body": "before"})).await.status,
        StatusCode::CREATED
    );

    // 10 of the 16 MiB taken: below the 8 MiB floor.
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![0u8; 10 << 20]).unwrap();
    let r = post_json(&app, &json!({"author": "a", "body": "while full"})).await;
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"error": "the server's disk is nearly full: writes are refused until space is freed"})
    );
    let form = call(
        &app,
        "POST",
        "/posts",
        Some("application/x-www-form-urlencoded"),
        "author=a&body=form",
    )
    .await;
    assert_eq!(form.status, StatusCode::INSUFFICIENT_STORAGE, "{}", form.body);
    let list = get(&app, "/api/posts").await;
    assert_eq!(list.status, StatusCode::OK, "reads go on");
    assert_eq!(list.json().as_array().unwrap().len(), 1, "nothing stored while full");
    assert_eq!(get(&app, "/posts").await.status, StatusCode::OK);

    std::fs::remove_file(&filler).unwrap();
    let r = post_json(&app, &json!({"author": "a", "body": "after"})).await;
    assert_eq!(r.status, StatusCode::CREATED, "writes resume by themselves: {}", r.body);
}

#[tokio::test]
async fn readyz_is_503_until_migrations_are_applied() {
    let config = Config {
        database_url: mariadb::shared().fresh_database(),
        ..Config::default()
    };
    let state = AppState::new(foobar_agent::db::pool(&config).unwrap(), None);
    let app = foobar_agent::app(state.clone());
    let r = get(&app, "/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("migrations not applied"), "{}", r.body);
    assert_eq!(get(&app, "/livez").await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let (app, _) = ready_app(None).await;
    post_json(&app, &json!({"author": "m", "body": "x"})).await;
    get(&app, "/api/posts/abc").await;
    get(&app, "/api/posts").await;
    let r = get(&app, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for line in [
        "foobar_http_requests_total{route=\"/api/posts\",status=\"201\"} 1",
        "foobar_http_requests_total{route=\"/api/posts\",status=\"200\"} 1",
        "foobar_http_requests_total{route=\"/api/posts/{id}\",status=\"400\"} 1",
        "foobar_http_request_duration_seconds_count 3",
        "foobar_migration_version 1",
        "foobar_db_pool_max_connections 16",
    ] {
        assert!(r.body.lines().any(|l| l == line), "missing `{line}` in:\n{}", r.body);
    }
}

/// Waits until a statement of the agent that starts with `prefix` waits on the table lock; its connection id.
async fn waiting(other: &mut sqlx::MySqlConnection, prefix: &str, not: Option<i64>) -> i64 {
    let started = tokio::time::Instant::now();
    loop {
        let rows: Vec<(i64, Option<String>)> =
            sqlx::query_as("SELECT ID, INFO FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()")
                .fetch_all(&mut *other)
                .await
                .unwrap();
        if let Some((id, _)) = rows
            .iter()
            .find(|(id, info)| Some(*id) != not && info.as_deref().is_some_and(|i| i.starts_with(prefix)))
        {
            return *id;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no `{prefix}...` waits: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_statement_whose_connection_is_cut_before_it_commits_runs_once_more_on_a_new_one() {
    // What a database proxy does when it takes a node out (a planned stop): it closes the node's open connections,
    // also one with a statement under way. Here the server kills it while the statement waits on a lock.
    let (app, state) = ready_app(None).await;
    let mut other = state.pool.acquire().await.unwrap().detach();
    sqlx::query("LOCK TABLES posts WRITE")
        .execute(&mut other)
        .await
        .unwrap();

    for (what, prefix) in [("a write", "INSERT INTO posts"), ("a read", "SELECT id, author")] {
        let request = {
            let app = app.clone();
            tokio::spawn(async move {
                if what == "a write" {
                    post_json(&app, &json!({"author": "cut", "body": "once"})).await
                } else {
                    get(&app, "/api/posts?limit=7").await
                }
            })
        };
        let first = waiting(&mut other, prefix, None).await;
        sqlx::query(&format!("KILL CONNECTION {first}"))
            .execute(&mut other)
            .await
            .unwrap();
        // The same statement again, on another connection.
        let second = waiting(&mut other, prefix, Some(first)).await;
        assert_ne!(second, first);
        sqlx::query("UNLOCK TABLES").execute(&mut other).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .unwrap()
            .unwrap();
        assert!(
            reply.status.is_success(),
            "{what} whose connection was cut: {} {}",
            reply.status,
            reply.body
        );
        sqlx::query("LOCK TABLES posts WRITE")
            .execute(&mut other)
            .await
            .unwrap();
    }
    sqlx::query("UNLOCK TABLES").execute(&mut other).await.unwrap();
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM posts WHERE body = 'once'")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(count, 1, "the write was made once");
}

/// Where a `CommitCutter` cuts a connection at the COMMIT it is armed for.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The COMMIT goes to the server; the connection is closed when the server answers, instead of passing the answer
    /// on: the transaction committed, and the client cannot know.
    Answered,
    /// The connection is closed instead of passing the COMMIT on: the server rolls the transaction back.
    Unsent,
}

/// A proxy on a socket of its own in front of the test server's, passing the MySQL protocol through unchanged until it
/// is armed: then it cuts the next connection that sends a COMMIT (what a database proxy taking a node out, or a
/// node's crash, does to a client between its COMMIT and the answer).
struct CommitCutter {
    socket: std::path::PathBuf,
    armed: std::sync::Arc<std::sync::Mutex<Option<Cut>>>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitCutter {
    fn start(server: std::path::PathBuf) -> CommitCutter {
        let socket = crate::support::temp_dir("cutter").join("cutter.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let armed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (task_armed, task_cuts) = (armed.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = tokio::net::UnixStream::connect(&server).await.unwrap();
                tokio::spawn(Self::pipe(client, upstream, task_armed.clone(), task_cuts.clone()));
            }
        });
        CommitCutter { socket, armed, cuts }
    }

    fn arm(&self, cut: Cut) {
        *self.armed.lock().unwrap() = Some(cut);
    }

    fn cuts(&self) -> usize {
        self.cuts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Passes bytes both ways, reading what the client sends packet by packet (3 bytes of length, a sequence number).
    async fn pipe(
        client: tokio::net::UnixStream,
        server: tokio::net::UnixStream,
        armed: std::sync::Arc<std::sync::Mutex<Option<Cut>>>,
        cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut from_client, mut to_client) = client.into_split();
        let (mut from_server, mut to_server) = server.into_split();
        let cutting = std::sync::Arc::new(AtomicBool::new(false));
        let answers = {
            let cutting = cutting.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = match from_server.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // After a COMMIT cut as `Answered`, the server's next bytes are its answer to it: not passed on.
                    if cutting.load(Ordering::SeqCst) || to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // `to_client` dropped: the client reads the end of the stream.
            })
        };
        loop {
            let mut header = [0u8; 4];
            if from_client.read_exact(&mut header).await.is_err() {
                break;
            }
            let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
            let mut payload = vec![0u8; len];
            if from_client.read_exact(&mut payload).await.is_err() {
                break;
            }
            // COM_QUERY (3) with the text COMMIT.
            if payload.eq_ignore_ascii_case(b"\x03COMMIT") {
                if let Some(cut) = armed.lock().unwrap().take() {
                    cuts.fetch_add(1, Ordering::SeqCst);
                    cutting.store(true, Ordering::SeqCst);
                    if let Cut::Unsent = cut {
                        answers.abort();
                        break;
                    }
                }
            }
            if to_server.write_all(&header).await.is_err() || to_server.write_all(&payload).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_is_looked_up_and_answered_by_its_outcome_and_never_run_twice() {
    let server = mariadb::shared();
    let url = server.fresh_database();
    let cutter = CommitCutter::start(server.socket());
    let through = url.replace(
        &format!("socket={}", server.socket().display()),
        &format!("socket={}", cutter.socket.display()),
    );
    assert_ne!(through, url);
    let (app, state) = ready_app_at(through, None).await;
    let count = |body: &'static str| {
        let pool = state.pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM posts WHERE body = ?")
                .bind(body)
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };

    // The COMMIT committed and its answer was lost: the agent looks the post up, finds it, and answers 201 with it.
    cutter.arm(Cut::Answered);
    let started = tokio::time::Instant::now();
    let reply = post_json(&app, &json!({"author": "lost", "body": "its answer"})).await;
    assert_eq!(cutter.cuts(), 1, "the COMMIT was cut");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["body"], "its answer");
    assert!(
        started.elapsed() >= foobar_agent::db::SETTLE,
        "looked up only after the settle time"
    );
    assert_eq!(
        count("its answer").await,
        1,
        "the post exists once: the write was not run again"
    );

    // The COMMIT never reached the server, which rolled back: nothing is found, the answer is 503 (the outcome was not
    // the agent's to know), and the write is not run again.
    cutter.arm(Cut::Unsent);
    let reply = post_json(&app, &json!({"author": "lost", "body": "never sent"})).await;
    assert_eq!(cutter.cuts(), 2, "the COMMIT was cut");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.body);
    assert!(!reply.body.contains("COMMIT"), "no internals: {}", reply.body);
    assert_eq!(count("never sent").await, 0, "nothing was written");

    // Unarmed, the proxy changes nothing.
    let reply = post_json(&app, &json!({"author": "lost", "body": "plain"})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(cutter.cuts(), 2);
}
