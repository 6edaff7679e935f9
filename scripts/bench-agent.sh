#!/usr/bin/env bash
# Drives the release agent with wrk against a throwaway MariaDB on this machine, 64 connections, and prints
# requests/s and p99 latency for GET /api/posts?limit=50 (answered from the read cache while nothing changes) and
# POST /api/posts: each run, then the median of 3.
set -euo pipefail

runs=${RUNS:-3}
duration=${DURATION:-10s}
root=$(cd "$(dirname "$0")/.." && pwd)
agent="$root/target/release/foobar-agent"
work=$(mktemp -d /tmp/foobar-bench.XXXXXX)
port=$((20000 + RANDOM % 20000))
cleanup() {
  [ -n "${agent_pid:-}" ] && kill "$agent_pid" 2>/dev/null || true
  [ -f "$work/mysqld.pid" ] && kill "$(cat "$work/mysqld.pid")" 2>/dev/null || true
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT

mariadb-install-db --no-defaults --datadir="$work/data" --user=root --skip-test-db \
  --auth-root-authentication-method=socket >/dev/null
mariadbd --no-defaults --datadir="$work/data" --socket="$work/mysqld.sock" --pid-file="$work/mysqld.pid" \
  --skip-networking --user=root --log-error="$work/error.log" --innodb-buffer-pool-size=256M \
  --max-connections=500 &
for _ in $(seq 100); do mariadb-admin --no-defaults --socket="$work/mysqld.sock" -u root ping >/dev/null 2>&1 && break; sleep 0.2; done
mariadb --no-defaults --socket="$work/mysqld.sock" -u root -e "CREATE DATABASE bench CHARACTER SET utf8mb4"

RUST_LOG=warn "$agent" serve --listen "127.0.0.1:$port" \
  --database-url "mysql://root@localhost/bench?socket=$work/mysqld.sock" &
agent_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
for i in $(seq 200); do
  curl -fs -o /dev/null -H 'Content-Type: application/json' \
    -d "{\"author\":\"bench\",\"body\":\"seed post $i with some text to make it realistic\"}" \
    "http://127.0.0.1:$port/api/posts"
done

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"author":"bench","body":"a post written by the load generator"}'
LUA

# Prints "req/s p99_ms" for one wrk run.
measure() {
  wrk -t2 -c64 -d"$duration" --latency "$@" | awk '
    /Requests\/sec/ { rps = $2 }
    /Non-2xx/ { bad = $NF }
    /Socket errors/ { errs = $0 }
    $1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 }; p99 = v }
    END {
      if (bad > 0 || errs != "") { printf "wrk saw failures: %d non-2xx; %s\n", bad, errs > "/dev/stderr"; exit 1 }
      printf "%.0f %.2f\n", rps, p99
    }'
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

report() {
  local name=$1; shift
  local out="$work/results.$RANDOM"
  : > "$out"
  for r in $(seq "$runs"); do
    measure "$@" | tee -a "$out" | awk -v n="$name" -v r="$r" '{ printf "%-22s run %d: %8s req/s  p99 %7s ms\n", n, r, $1, $2 }'
  done
  printf "%-22s MEDIAN: %8s req/s  p99 %7s ms  (min-max req/s: %s-%s)\n" "$name" \
    "$(cut -d' ' -f1 "$out" | median)" "$(cut -d' ' -f2 "$out" | median)" \
    "$(cut -d' ' -f1 "$out" | sort -n | head -1)" "$(cut -d' ' -f1 "$out" | sort -n | tail -1)"
}

echo "foobar-agent benchmark: wrk, 64 connections, $duration per run, $runs runs, $(nproc) cores"
report "GET /api/posts?limit=50" "http://127.0.0.1:$port/api/posts?limit=50"
report "POST /api/posts" -s "$work/post.lua" "http://127.0.0.1:$port/api/posts"
