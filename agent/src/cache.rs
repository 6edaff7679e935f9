//! The read cache: answers of the posts reads (`/api/posts` with its paging parameters, `/posts`,
//! `/api/posts/{id}`) kept in memory, so a read that nothing has changed since costs no database round trip.
//!
//! - **Own writes** invalidate at once: every stored post bumps the generation, and an answer made under an older
//!   generation is never served again (read-your-writes on this node). A read that started before a write stores its
//!   answer under the generation it started with, so it cannot outlive the write either.
//! - **Other nodes' writes** (agents sharing the database) are seen once an entry is older than the time to live,
//!   the staleness bound (`read-cache-ms`, 1 s by default, 0 turns the cache off). A restart starts empty; a
//!   database failover or restore is seen within the same bound.
//! - **Memory** is bounded: at most `MAX_BYTES` of answers; when a new one does not fit, expired entries go, then all.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;

/// The most answer bytes kept at once.
pub const MAX_BYTES: usize = 16 << 20;

/// Which answer: the list with its paging parameters, the HTML page, or one post.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    List { limit: u32, before: Option<u64> },
    Page,
    Post(u64),
}

/// A stored answer: its body and the validator sent as `ETag`.
#[derive(Debug, Clone)]
pub struct Answer {
    pub body: Bytes,
    pub etag: String,
}

impl Answer {
    /// The answer for `body`, with an entity tag derived from its bytes alone, so every node that holds the same
    /// answer gives the same tag (behind a load balancer, a client's `If-None-Match` works on any of them).
    pub fn new(body: Bytes) -> Answer {
        // SipHash with fixed keys: the same bytes give the same tag in every process of this build.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut hasher);
        let etag = format!("\"{:x}-{:016x}\"", body.len(), hasher.finish());
        Answer { body, etag }
    }
}

struct Entry {
    answer: Answer,
    made: Instant,
    generation: u64,
}

pub struct ReadCache {
    ttl: Duration,
    generation: AtomicU64,
    entries: Mutex<(HashMap<Key, Entry>, usize)>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub invalidations: AtomicU64,
}

impl ReadCache {
    /// A cache whose entries live for `ttl`; a zero `ttl` keeps nothing.
    pub fn new(ttl: Duration) -> ReadCache {
        ReadCache {
            ttl,
            generation: AtomicU64::new(0),
            entries: Mutex::new((HashMap::new(), 0)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// The generation to record a new answer under: take it before asking the database.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A current answer for `key`, if one is kept; counts the hit or the miss.
    pub fn get(&self, key: &Key) -> Option<Answer> {
        let current = self.generation();
        let found = {
            let entries = self.entries.lock().expect("read cache lock");
            entries
                .0
                .get(key)
                .filter(|e| e.generation == current && e.made.elapsed() < self.ttl)
                .map(|e| e.answer.clone())
        };
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `answer`, made from the database as it was at `generation`; an answer made before a write since is
    /// dropped.
    pub fn put(&self, key: Key, generation: u64, answer: Answer) {
        if self.ttl.is_zero() || generation != self.generation() || answer.body.len() > MAX_BYTES {
            return;
        }
        let mut guard = self.entries.lock().expect("read cache lock");
        let (entries, bytes) = &mut *guard;
        if *bytes + answer.body.len() > MAX_BYTES {
            let (ttl, current) = (self.ttl, generation);
            entries.retain(|_, e| e.generation == current && e.made.elapsed() < ttl);
            *bytes = entries.values().map(|e| e.answer.body.len()).sum();
            if *bytes + answer.body.len() > MAX_BYTES {
                entries.clear();
                *bytes = 0;
            }
        }
        *bytes += answer.body.len();
        if let Some(old) = entries.insert(
            key,
            Entry {
                answer,
                made: Instant::now(),
                generation,
            },
        ) {
            *bytes -= old.answer.body.len();
        }
    }

    /// This node stored a post: nothing kept so far is served again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.entries.lock().expect("read cache lock");
        guard.0.clear();
        guard.1 = 0;
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
