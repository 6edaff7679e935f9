'use strict';
// The Node.js example's app: a page of notes kept in MariaDB.
// foobar-agent runs it after applying migrations/0001_notes.sql, passes the port to listen on as the first argument,
// and tells it where the database is (DATABASE_SOCKET, DATABASE_USER, DATABASE_NAME: the unix socket, no password).

const http = require('http');
const mysql = require('mysql');

const port = Number(process.argv[2]);
const MAX_NOTE = 500;
const MAX_BODY = 16 * 1024;

const pool = mysql.createPool({
  socketPath: process.env.DATABASE_SOCKET,
  user: process.env.DATABASE_USER,
  database: process.env.DATABASE_NAME,
  charset: 'utf8mb4',
  connectionLimit: 4,
});

function query(sql, args) {
  return new Promise((resolve, reject) => {
    pool.query(sql, args, (err, rows) => (err ? reject(err) : resolve(rows)));
  });
}

const ENTITIES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => ENTITIES[c]);

function send(res, status, type, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

function sendJson(res, status, value) {
  send(res, status, 'application/json', JSON.stringify(value));
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > MAX_BODY) {
        reject(Object.assign(new Error('body too large'), { status: 413 }));
        req.destroy();
      }
    });
    req.on('end', () => resolve(body));
    req.on('error', reject);
  });
}

async function notesPage(res) {
  const rows = await query('SELECT body FROM notes ORDER BY id DESC LIMIT 50');
  const items = rows.map((row) => `<li>${escapeHtml(row.body)}</li>`).join('\n');
  send(res, 200, 'text/html; charset=utf-8',
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Notes (Node.js)</title>' +
    '<link rel="stylesheet" href="/static/site.css"></head><body>\n' +
    '<h1>Notes</h1>\n<p>Served by Node.js, run by foobar-agent.</p>\n' +
    '<form method="post" action="/notes"><input name="body" maxlength="500" required> <button>Add</button></form>\n' +
    `<ul>\n${items}\n</ul>\n</body></html>\n`);
}

async function addNote(req, res) {
  const form = new URLSearchParams(await readBody(req));
  const body = (form.get('body') || '').trim();
  if (!body || body.length > MAX_NOTE) {
    return sendJson(res, 400, { error: `a note needs a \`body\` of 1 to ${MAX_NOTE} characters` });
  }
  await query('INSERT INTO notes (body) VALUES (?)', [body]);
  send(res, 303, 'text/plain', 'see /notes\n', { Location: '/notes' });
}

async function handle(req, res) {
  const { pathname } = new URL(req.url, 'http://localhost');
  if (pathname === '/health' && req.method === 'GET') {
    const [row] = await query('SELECT COUNT(*) AS notes FROM notes');
    return sendJson(res, 200, { status: 'ok', notes: row.notes });
  }
  if (pathname === '/notes' && req.method === 'GET') return notesPage(res);
  if (pathname === '/notes' && req.method === 'POST') return addNote(req, res);
  if (pathname === '/notes') return sendJson(res, 405, { error: 'method not allowed' });
  return sendJson(res, 404, { error: 'not found' });
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    if (err.status) return sendJson(res, err.status, { error: err.message });
    console.error(`request failed: ${err.code || err.message}`);
    return sendJson(res, 503, { error: 'database unavailable' });
  });
});

server.listen(port, '127.0.0.1', () => console.log(`notes-node listening on 127.0.0.1:${port}`));

process.on('SIGTERM', () => {
  console.log('got SIGTERM, stopping');
  server.close(() => pool.end(() => process.exit(0)));
  setTimeout(() => process.exit(0), 5000).unref();
});
