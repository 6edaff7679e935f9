//! The built-in posts app: the JSON API under `/api/posts` and the server-rendered page at `/posts`.

use std::collections::HashMap;

use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};

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
        // MariaDB's INSERT ... RETURNING sends no column metadata for prepared statements, which sqlx needs,
        // so the stored row is read back by its id.
        let id = sqlx::query("INSERT INTO posts (author, body, created_at) VALUES (?, ?, UTC_TIMESTAMP(6))")
            .bind(&self.author)
            .bind(&self.body)
            .execute(&state.pool)
            .await?
            .last_insert_id();
        fetch(state, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("post {id} vanished after insert")))
    }
}

async fn fetch(state: &AppState, id: u64) -> Result<Option<Post>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM posts WHERE id = ?");
    Ok(sqlx::query_as::<_, Post>(&sql)
        .bind(id)
        .fetch_optional(&state.pool)
        .await?)
}

/// Newest first, strictly older than `before` (an id) when given.
async fn list(state: &AppState, limit: u32, before: Option<u64>) -> Result<Vec<Post>, ApiError> {
    let sql = format!("SELECT {COLUMNS} FROM posts WHERE id < ? ORDER BY id DESC LIMIT ?");
    Ok(sqlx::query_as::<_, Post>(&sql)
        .bind(before.unwrap_or(u64::MAX))
        .bind(limit)
        .fetch_all(&state.pool)
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
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<Vec<Post>>, ApiError> {
    let Query(params) = query?;
    let range = format!("a whole number from 1 to {LIMIT_MAX}");
    let limit = parse_param::<u32>(&params, "limit", &range)?.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(ApiError::BadRequest(format!("`limit` must be {range}, got `{limit}`")));
    }
    let before = parse_param::<u64>(&params, "before", "a post id")?;
    Ok(Json(list(&state, limit, before).await?))
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

pub async fn get_post(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Post>, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("post id must be a positive whole number, got `{id}`")))?;
    fetch(&state, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no post with id {id}")))
}

/// The HTML page: the newest posts and a form that posts back here.
pub async fn page(State(state): State<AppState>) -> Result<Html<String>, ApiError> {
    let posts = list(&state, PAGE_POSTS, None).await?;
    let mut context = tera::Context::new();
    context.insert("posts", &posts);
    context.insert("author_max", &AUTHOR_MAX_CHARS);
    context.insert("body_max", &BODY_MAX_CHARS);
    let html = state.templates.render("posts.html", &context).map_err(|err| {
        tracing::error!(error = ?err, "cannot render posts.html");
        ApiError::BadRequest("cannot render the page".to_string())
    })?;
    Ok(Html(html))
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
