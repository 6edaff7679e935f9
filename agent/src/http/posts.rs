//! The built-in posts app: the JSON API under `/api/posts` and the server-rendered page at `/posts`. Reads are
//! answered from the read cache when nothing has changed (`cache.rs`), with an `ETag` and `Cache-Control: no-cache`
//! (any cache revalidates; an unchanged answer costs a 304); writes empty it.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};

use crate::cache::{Answer, Key};
use crate::http::error::ApiError;
use crate::state::AppState;

pub const AUTHOR_MAX_CHARS: usize = 100;
pub const BODY_MAX_CHARS: usize = 10_000;
const LIMIT_DEFAULT: u32 = 20;
const LIMIT_MAX: u32 = 100;
/// How many posts the HTML page shows.
const PAGE_POSTS: u32 = 50;

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Post {
    pub id: u64,
    pub author: String,
    pub body: String,
    /// RFC 3339 in UTC, formatted by the database.
    pub created_at: String,
}

#[derive(Debug, Deserialize)]
pub struct NewPost {
    author: String,
    body: String,
}

const COLUMNS: &str = "id, author, body, DATE_FORMAT(created_at, '%Y-%m-%dT%H:%i:%s.%fZ') AS created_at";

impl NewPost {
    /// Checks lengths in characters (not bytes); the text itself is stored exactly as sent.
    fn validate(&self) -> Result<(), ApiError> {
        let field = |name: &str, value: &str, max: usize| {
            if value.trim().is_empty() {
                return Err(ApiError::BadRequest(format!("`{name}` must not be empty")));
            }
            if value.chars().count() > max {
                return Err(ApiError::BadRequest(format!(
                    "`{name}` is longer than {max} characters"
                )));
            }
            Ok(())
        };
        field("author", &self.author, AUTHOR_MAX_CHARS)?;
        field("body", &self.body, BODY_MAX_CHARS)
    }

    async fn insert(&self, state: &AppState) -> Result<Post, ApiError> {
        self.validate()?;
        if let Some(Err(free)) = state.disk.get().map(|d| d.check()) {
            tracing::warn!(free_mib = free >> 20, "a write refused: the disk is nearly full");
            return Err(ApiError::DiskFull);
        }
        // MariaDB's INSERT ... RETURNING sends no column metadata for prepared statements, which sqlx needs,
        // so the stored row is read back by its id, causally: on whichever node answers (a cluster's proxy may send
        // the read to another node than the write), after every write the cluster has ordered.
        let id = crate::db::write(
            &state.pool,
            "INSERT INTO posts (author, body, created_at) VALUES (?, ?, UTC_TIMESTAMP(6))",
            &[&self.author, &self.body],
            |id| self.stored(state, id),
        )
        .await?
        .last_insert_id();
        let post = fetch_causal(state, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("post {id} vanished after insert")))?;
        // Before the answer goes out, so the writer's next read sees the post.
        state.cache.invalidate();
        Ok(post)
    }

    /// Whether post `id` is this one: the outcome of a COMMIT whose answer was lost. The id was the INSERT's own,
    /// assigned before the COMMIT; a rolled-back id is not reused by the node that assigned it, and another post with
    /// the same id would also need the same author and body.
    async fn stored(&self, state: &AppState, id: u64) -> Result<bool, sqlx::Error> {
        Ok(fetch_causal(state, id)
            .await?
            .is_some_and(|post| post.author == self.author && post.body == self.body))
    }
}

const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";

/// Answers `key` from the read cache, or makes it with `make` (which asks the database) and keeps it.
async fn cached<F, Fut>(
    state: &AppState,
    key: Key,
    request: &HeaderMap,
    content_type: &'static str,
    make: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Bytes, ApiError>>,
{
    let answer = match state.cache.get(&key) {
        Some(answer) => answer,
        None => {
            // Taken before the query: a write that lands meanwhile makes this answer unkeepable.
            let generation = state.cache.generation();
            let answer = Answer::new(make().await?);
            state.cache.put(key, generation, answer.clone());
            answer
        }
    };
    Ok(respond(&answer, request, content_type))
}

/// 304 when the client already holds this answer (`If-None-Match`), else 200 with the body. Either way the `ETag`,
/// and `Cache-Control: no-cache`: a browser or shared cache may keep the answer but must ask again before using it,
/// so none serves a stale one.
fn respond(answer: &Answer, request: &HeaderMap, content_type: &'static str) -> Response {
    let held = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == answer.etag);
    let etag = HeaderValue::from_str(&answer.etag).expect("an entity tag is a valid header value");
    let validators = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if held {
        (StatusCode::NOT_MODIFIED, validators).into_response()
    } else {
        (
            validators,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            answer.body.clone(),
        )
            .into_response()
    }
}

fn json_bytes(value: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("posts serialize to JSON"))
}

async fn fetch(state: &AppState, id: u64) -> Result<Option<Post>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM posts WHERE id = ?");
    Ok(crate::db::read(|| sqlx::query_as::<_, Post>(&sql).bind(id).fetch_optional(&state.pool)).await?)
}

/// Post `id`, read after every write the cluster has ordered (Galera's causality wait; nothing without Galera).
async fn fetch_causal(state: &AppState, id: u64) -> Result<Option<Post>, sqlx::Error> {
    let sql = format!("SET STATEMENT wsrep_sync_wait = 1 FOR SELECT {COLUMNS} FROM posts WHERE id = ?");
    crate::db::read(|| sqlx::query_as::<_, Post>(&sql).bind(id).fetch_optional(&state.pool)).await
}

/// Newest first, strictly older than `before` (an id) when given.
async fn list(state: &AppState, limit: u32, before: Option<u64>) -> Result<Vec<Post>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM posts WHERE id < ? ORDER BY id DESC LIMIT ?");
    Ok(crate::db::read(|| {
        sqlx::query_as::<_, Post>(&sql)
            .bind(before.unwrap_or(u64::MAX))
            .bind(limit)
            .fetch_all(&state.pool)
    })
    .await?)
}

fn parse_param<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    name: &str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match params.get(name) {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("`{name}` must be {expected}, got `{text}`"))),
    }
}

pub async fn list_posts(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query?;
    let range = format!("a whole number from 1 to {LIMIT_MAX}");
    let limit = parse_param::<u32>(&params, "limit", &range)?.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(ApiError::BadRequest(format!("`limit` must be {range}, got `{limit}`")));
    }
    let before = parse_param::<u64>(&params, "before", "a post id")?;
    cached(&state, Key::List { limit, before }, &headers, JSON, || async {
        Ok(json_bytes(&list(&state, limit, before).await?))
    })
    .await
}

pub async fn create_post(
    State(state): State<AppState>,
    body: Result<Json<NewPost>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(new) = body?;
    let post = new.insert(&state).await?;
    let location = format!("/api/posts/{}", post.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(post)).into_response())
}

pub async fn get_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("post id must be a positive whole number, got `{id}`")))?;
    cached(&state, Key::Post(id), &headers, JSON, || async {
        let post = fetch(&state, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no post with id {id}")))?;
        Ok(json_bytes(&post))
    })
    .await
}

/// The HTML page: the newest posts and a form that posts back here.
pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    cached(&state, Key::Page, &headers, HTML, || async {
        let posts = list(&state, PAGE_POSTS, None).await?;
        let mut context = tera::Context::new();
        context.insert("posts", &posts);
        context.insert("author_max", &AUTHOR_MAX_CHARS);
        context.insert("body_max", &BODY_MAX_CHARS);
        let html = state.templates.render("posts.html", &context).map_err(|err| {
            tracing::error!(error = ?err, "cannot render posts.html");
            ApiError::Page
        })?;
        Ok(Bytes::from(html))
    })
    .await
}

/// The form's target: stores the post and sends the browser back to the page (303, so a reload does not repost).
pub async fn submit(
    State(state): State<AppState>,
    form: Result<Form<NewPost>, FormRejection>,
) -> Result<Redirect, ApiError> {
    let Form(new) = form?;
    new.insert(&state).await?;
    Ok(Redirect::to("/posts"))
}
