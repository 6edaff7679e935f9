"""The Flask example's app: a page of notes kept in MariaDB.

foobar-agent runs it under gunicorn after applying migrations/0001_notes.sql, and tells it where the database is
(DATABASE_SOCKET, DATABASE_USER, DATABASE_NAME: the unix socket, with no password).
"""
import html
import os

import pymysql
from flask import Flask, jsonify, redirect, request

app = Flask(__name__)
MAX_NOTE = 500


def connect():
    return pymysql.connect(
        unix_socket=os.environ["DATABASE_SOCKET"],
        user=os.environ["DATABASE_USER"],
        database=os.environ["DATABASE_NAME"],
        charset="utf8mb4",
        autocommit=True,
    )


@app.get("/health")
def health():
    with connect() as db, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM notes")
        (count,) = cursor.fetchone()
    return jsonify(status="ok", notes=count)


@app.get("/notes")
def notes():
    with connect() as db, db.cursor() as cursor:
        cursor.execute("SELECT body FROM notes ORDER BY id DESC LIMIT 50")
        rows = cursor.fetchall()
    items = "\n".join(f"<li>{html.escape(body)}</li>" for (body,) in rows)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Notes (Flask)</title>"
        "<link rel=\"stylesheet\" href=\"/static/site.css\"></head><body>\n"
        "<h1>Notes</h1>\n<p>Served by Flask under gunicorn, run by foobar-agent.</p>\n"
        "<form method=\"post\" action=\"/notes\"><input name=\"body\" maxlength=\"500\" required> "
        "<button>Add</button></form>\n"
        f"<ul>\n{items}\n</ul>\n</body></html>\n"
    )


@app.post("/notes")
def add_note():
    body = request.form.get("body", "").strip()
    if not body or len(body) > MAX_NOTE:
        return jsonify(error=f"a note needs a `body` of 1 to {MAX_NOTE} characters"), 400
    with connect() as db, db.cursor() as cursor:
        cursor.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
    return redirect("/notes", code=303)


@app.errorhandler(404)
def not_found(_error):
    return jsonify(error="not found"), 404


@app.errorhandler(405)
def wrong_method(_error):
    return jsonify(error="method not allowed"), 405


@app.errorhandler(pymysql.err.OperationalError)
def database_down(_error):
    return jsonify(error="database unavailable"), 503
