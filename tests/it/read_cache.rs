//! The read cache of the posts app, from the outside: answers through `app().oneshot(...)` against a real MariaDB.
//! Read-your-writes on one node, the staleness bound between two agents sharing one database, `ETag` and 304.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use foobar_agent::config::Config;
use foobar_agent::db::migrate;
use foobar_agent::state::MigrationStatus;
use foobar_agent::AppState;
use serde_json::{json, Value};

use crate::agent_http::{send, Reply};
use crate::support::mariadb;

/// An agent (its app and state) on `database_url`, migrated, with the read cache kept for `ttl`.
async fn agent(database_url: &str, ttl: Duration) -> (Router, AppState) {
    let config = Config {
        database_url: database_url.to_string(),
        ..Config::default()
    };
    let pool = foobar_agent::db::pool(&config).unwrap();
    let migrator = migrate::load(None).await.unwrap();
    let applied = migrate::apply(&pool, &migrator, Duration::from_secs(10)).await.unwrap();
    let state = AppState::with_app(pool, None, None, ttl);
    state.set_migration_status(MigrationStatus::Applied {
        version: applied.version,
        newly_applied: applied.newly_applied,
        unknown: applied.unknown,
    });
    (foobar_agent::app(state.clone()), state)
}

/// The answer's `ETag`, which every cached read carries.
fn etag(reply: &Reply) -> String {
    reply
        .headers
        .get(header::ETAG)
        .unwrap_or_else(|| panic!("no ETag: {:?}", reply.headers))
        .to_str()
        .unwrap()
        .to_string()
}

async fn get(app: &Router, path: &str, if_none_match: Option<&str>) -> Reply {
    let mut req = Request::get(path);
    if let Some(tag) = if_none_match {
        req = req.header(header::IF_NONE_MATCH, tag);
    }
    send(app, req.body(Body::empty()).unwrap()).await
}

async fn post(app: &Router, body: &str) -> Reply {
    let req = Request::post("/api/posts")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"author": "cache", "body": body}).to_string()))
        .unwrap();
    send(app, req).await
}

fn bodies(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p["body"].as_str().unwrap().to_string())
        .collect()
}

/// `name`'s value in the agent's `/metrics`.
async fn metric(app: &Router, name: &str) -> u64 {
    let text = get(app, "/metrics", None).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[tokio::test]
async fn an_unchanged_list_is_a_304_and_a_post_changes_it_at_once() {
    let url = mariadb::shared().fresh_database();
    let (app, _) = agent(&url, Duration::from_secs(1)).await;
    assert_eq!(post(&app, "first").await.status, StatusCode::CREATED);

    let first = get(&app, "/api/posts", None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers[header::CACHE_CONTROL], "no-cache");
    let tag = etag(&first);
    let again = get(&app, "/api/posts", Some(&tag)).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{}", again.body);
    assert!(again.body.is_empty(), "a 304 has no body: {}", again.body);
    assert_eq!(etag(&again), tag);
    assert!(metric(&app, "foobar_read_cache_hits_total").await >= 1);

    // A write here: the next read has it, and the old tag no longer matches.
    let created = post(&app, "second").await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let after = get(&app, "/api/posts", Some(&tag)).await;
    assert_eq!(after.status, StatusCode::OK);
    assert_ne!(etag(&after), tag);
    assert_eq!(bodies(&after.json()), ["second", "first"]);
    assert_eq!(metric(&app, "foobar_read_cache_invalidations_total").await, 2);

    // The page and one post carry validators too.
    let page = get(&app, "/posts", None).await;
    assert!(page.headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(
        get(&app, "/posts", Some(&etag(&page))).await.status,
        StatusCode::NOT_MODIFIED
    );
    let form = Request::post("/posts")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from("author=form&body=from+the+page"))
        .unwrap();
    assert_eq!(send(&app, form).await.status, StatusCode::SEE_OTHER);
    let page_after = get(&app, "/posts", Some(&etag(&page))).await;
    assert_eq!(page_after.status, StatusCode::OK);
    assert!(page_after.body.contains("from the page"), "{}", page_after.body);
    let id = created.json()["id"].as_u64().unwrap();
    let one = get(&app, &format!("/api/posts/{id}"), None).await;
    assert_eq!(one.json()["body"], "second");
    assert_eq!(
        get(&app, &format!("/api/posts/{id}"), Some(&etag(&one))).await.status,
        StatusCode::NOT_MODIFIED
    );
    // A tag list and the weak form match too; another tag does not.
    let list_tag = etag(&get(&app, "/api/posts", None).await);
    let listed = format!("\"nope\", W/{list_tag}");
    assert_eq!(
        get(&app, "/api/posts", Some(&listed)).await.status,
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(get(&app, "/api/posts", Some("\"nope\"")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_posts_all_land_and_each_is_read_back_at_once_on_its_node() {
    let url = mariadb::shared().fresh_database();
    let (app, _) = agent(&url, Duration::from_secs(1)).await;
    // Readers keep the cache warm while writers post; each writer reads its post back right after its 201.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                for _ in 0..10 {
                    assert_eq!(get(&app, "/api/posts?limit=100", None).await.status, StatusCode::OK);
                }
                return None;
            }
            let text = format!("concurrent {i}");
            // The list as it was before this post, kept by the cache.
            let before = bodies(&get(&app, "/api/posts?limit=100", None).await.json());
            assert!(!before.contains(&text));
            let created = post(&app, &text).await;
            assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
            let listed = bodies(&get(&app, "/api/posts?limit=100", None).await.json());
            assert!(
                listed.contains(&text),
                "post {i} missing from the next read: {listed:?}"
            );
            let page = get(&app, "/posts", None).await.body;
            assert!(page.contains(&text), "post {i} missing from the next page");
            Some(text)
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.unwrap());
    }
    let listed = bodies(&get(&app, "/api/posts?limit=100", None).await.json());
    assert_eq!(listed.len(), written.len(), "{listed:?}");
    for text in &written {
        assert!(listed.contains(text), "{text} lost");
    }
}

#[tokio::test]
async fn another_agents_write_is_seen_within_the_bound_and_not_before_the_cache_expires() {
    let url = mariadb::shared().fresh_database();
    let bound = Duration::from_secs(1);
    let (a, _) = agent(&url, bound).await;
    let (b, _) = agent(&url, bound).await;
    assert_eq!(post(&a, "before").await.status, StatusCode::CREATED);
    assert_eq!(bodies(&get(&b, "/api/posts", None).await.json()), ["before"]);

    let written = Instant::now();
    assert_eq!(post(&a, "on a").await.status, StatusCode::CREATED);
    // A reads its own write at once; B answers from its cache until its entry is older than the bound.
    assert_eq!(bodies(&get(&a, "/api/posts", None).await.json()), ["on a", "before"]);
    let stale = bodies(&get(&b, "/api/posts", None).await.json());
    if written.elapsed() < bound / 2 {
        assert_eq!(stale, ["before"], "B did not answer from its cache");
    }
    let seen = loop {
        let listed = bodies(&get(&b, "/api/posts", None).await.json());
        if listed.first().map(String::as_str) == Some("on a") {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < bound * 3,
            "B still stale after {:?}",
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("another agent's write seen after {seen:?} (bound {bound:?})");
    assert!(
        seen <= bound + Duration::from_millis(150),
        "seen after {seen:?}, bound {bound:?}"
    );
    assert!(metric(&b, "foobar_read_cache_hits_total").await >= 1);
}

#[tokio::test]
async fn a_read_cache_of_zero_asks_the_database_every_time() {
    let url = mariadb::shared().fresh_database();
    let (a, _) = agent(&url, Duration::ZERO).await;
    let (b, _) = agent(&url, Duration::ZERO).await;
    assert_eq!(bodies(&get(&b, "/api/posts", None).await.json()), Vec::<String>::new());
    assert_eq!(post(&a, "at once").await.status, StatusCode::CREATED);
    assert_eq!(bodies(&get(&b, "/api/posts", None).await.json()), ["at once"]);
    assert_eq!(metric(&b, "foobar_read_cache_hits_total").await, 0);
    assert_eq!(metric(&b, "foobar_read_cache_misses_total").await, 2);
}
