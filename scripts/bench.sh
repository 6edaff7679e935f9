#!/usr/bin/env bash
# The image benchmark (`just bench`): cold build (empty cache), warm build (agent changed, cached package layer),
# image sizes, first and second boot-to-ready under QEMU (medians of BOOTS boots each), and requests/s through nginx
# on a booted guest (LOAD_RUNS rounds, default 3) for GET / (static), GET /api/posts and GET /posts (dynamic, from
# the agent's read cache while nothing changes) and POST /api/posts (nginx limits writes per client address: the
# 201s and the 429s are counted apart), and the ratio dynamic/static. Prints one table: median, min, max, runs.
# COLD_RUNS=0 skips the cold build and takes the package layer from the default cache.
# Needs the release binaries (`just bench` builds them). Takes about 15 minutes under TCG.
set -euo pipefail

boots=${BOOTS:-5}
warm_runs=${WARM_RUNS:-3}
cold_runs=${COLD_RUNS:-1}
load=${LOAD:-10s}
load_runs=${LOAD_RUNS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
imagebuild="$root/target/release/imagebuild"
agent="$root/target/release/foobar-agent"
work=$(mktemp -d /tmp/foobar-bench.XXXXXX)
port=$((20000 + RANDOM % 20000))
site=www.foobar.com
declare -A results
qemu_pid=

cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.1f'; }
record() { results[$1]="${results[$1]:-} $2"; }
log() { echo "bench: $*" >&2; }

# Sets $ready to the seconds from QEMU start until /readyz answers 200 through nginx; leaves the guest running
# ($qemu_pid). Not to be called in a subshell: the caller must see $qemu_pid to power the guest off.
# A probe starts every 0.2 s in the background, each with its own 3 s limit, and $ready is when the first 200
# arrived (the probe's start plus curl's own total time). Until the guest's network is up, QEMU accepts the
# connection and nothing answers, so one probe at a time (each waiting out its limit) would measure in steps of its
# limit rather than of 0.2 s.
boot_ready() {
  local image=$1; shift
  local start; start=$(now)
  local probes="$work/probes"
  rm -rf "$probes"; mkdir -p "$probes"
  ready=
  "$imagebuild" boot "$image" --port "$port" --serial "$work/serial.log" --monitor "$work/monitor.sock" "$@" \
    >/dev/null 2>"$work/qemu.log" &
  qemu_pid=$!
  local i sent first
  for i in $(seq 1200); do
    sent=$(echo "$(now) - $start" | bc -l)
    (curl -s -o /dev/null -m 3 -w "$sent %{http_code} %{time_total}\n" -H "Host: $site" \
      "http://127.0.0.1:$port/readyz" > "$probes/$i.part" 2>/dev/null; mv "$probes/$i.part" "$probes/done.$i") &
    sleep 0.2
    first=$(cat "$probes"/done.* 2>/dev/null | awk '$2 == 200 {print $1 + $3}' | sort -g | head -1) || true
    if [ -n "$first" ]; then ready=$(printf '%.1f' "$first"); return; fi
    kill -0 "$qemu_pid" 2>/dev/null || { log "QEMU exited"; tail -20 "$work/serial.log" >&2; exit 1; }
  done
  log "not ready after 240 s"; exit 1
}

power_off() {
  [ -n "$qemu_pid" ] || { log "power_off without a guest"; exit 1; }
  echo system_powerdown | socat - "UNIX-CONNECT:$work/monitor.sock" >/dev/null 2>&1 || true
  for _ in $(seq 300); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
  kill "$qemu_pid" 2>/dev/null || true
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
  rm -f "$work/monitor.sock"
}

# Cold: an empty cache directory, so mmdebstrap runs.
for i in $(seq "$cold_runs"); do
  log "cold build $i/$cold_runs"
  rm -rf "$work/cache"
  start=$(now)
  "$imagebuild" --out "$work/cold.qcow2" --cache-dir "$work/cache" --agent-bin "$agent" 2>"$work/build.log" \
    || { tail -20 "$work/build.log"; exit 1; }
  record "cold build (s)" "$(since "$start")"
done
cache="$work/cache"
if [ "$cold_runs" -eq 0 ]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/foobar"
fi
[ -d "$cache" ] || { log "no package layer cache at $cache"; exit 1; }

# Warm: the agent changes (a different binary each time), the package layer comes from the cache.
for i in $(seq "$warm_runs"); do
  log "warm build $i/$warm_runs"
  cp "$agent" "$work/agent"
  printf 'bench %s' "$i" >> "$work/agent"
  start=$(now)
  "$imagebuild" --out "$work/warm.qcow2" --cache-dir "$cache" \
    --agent-bin "$work/agent" 2>"$work/build.log" || { tail -20 "$work/build.log"; exit 1; }
  record "warm build (s)" "$(since "$start")"
done
record "qcow2 (MB)" "$(stat -c %s "$work/warm.qcow2" | awk '{printf "%.1f", $1/1e6}')"
image="$work/warm.qcow2"

for i in $(seq "$boots"); do
  log "first boot $i/$boots"
  boot_ready "$image"
  record "first boot to ready (s)" "$ready"
  power_off
done

# Second boots: one first boot written to a copy, then each later boot on a throwaway overlay of it.
cp "$image" "$work/booted.qcow2"
boot_ready "$work/booted.qcow2" --write
power_off
for i in $(seq "$boots"); do
  log "second boot $i/$boots"
  boot_ready "$work/booted.qcow2"
  record "second boot to ready (s)" "$ready"
  if [ "$i" -lt "$boots" ]; then power_off; fi
done

# Load through nginx on the last guest: 2 threads, 16 connections, $load each, $load_runs rounds. 20 posts first
# (nginx's burst for one client), so the dynamic answers are of a realistic size.
for i in $(seq 20); do
  curl -fs -o /dev/null -H "Host: $site" -H 'Content-Type: application/json' \
    -d "{\"author\":\"bench\",\"body\":\"seed post $i with some text to make it realistic\"}" \
    "http://127.0.0.1:$port/api/posts" || { log "seeding post $i failed"; exit 1; }
done
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"author":"bench","body":"a post written by the load generator"}'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) created = 0; limited = 0; other = 0 end
function response(status, headers, body)
  if status == 201 then created = created + 1 elseif status == 429 then limited = limited + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local c, l, o = 0, 0, 0
  for _, t in ipairs(threads) do c = c + t:get("created"); l = l + t:get("limited"); o = o + t:get("other") end
  io.write(string.format("statuses %d %d %d %f\n", c, l, o, summary.duration / 1e6))
end
LUA
for round in $(seq "$load_runs"); do
  for path in / /api/posts /posts; do
    log "wrk GET $path (round $round/$load_runs)"
    out=$(wrk -t2 -c16 -d"$load" -H "Host: $site" "http://127.0.0.1:$port$path")
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    [ -z "$non2xx" ] || { log "$path: $non2xx non-2xx answers"; echo "$out" >&2; exit 1; }
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    record "GET $path through nginx (req/s)" "$rps"
    [ "$path" = / ] && static=$rps
    [ "$path" = /api/posts ] && record "GET /api/posts / GET / (%)" "$(echo "100 * $rps / $static" | bc -l | xargs printf '%.0f')"
  done
  log "wrk POST /api/posts (round $round/$load_runs)"
  out=$(wrk -t2 -c16 -d"$load" -H "Host: $site" -s "$work/post.lua" "http://127.0.0.1:$port/api/posts")
  read -r created limited other secs < <(echo "$out" | awk '/^statuses/ {print $2, $3, $4, $5}')
  [ "$other" -eq 0 ] || { log "POST: $other answers neither 201 nor 429"; echo "$out" >&2; exit 1; }
  record "POST /api/posts through nginx (req/s)" "$(echo "$out" | awk '/Requests\/sec/ {print $2}')"
  record "  of which 201 Created (req/s)" "$(echo "$created / $secs" | bc -l | xargs printf '%.1f')"
done
power_off

printf '\n%-36s %10s %10s %10s %5s\n' metric median min max runs
for metric in "cold build (s)" "warm build (s)" "qcow2 (MB)" "first boot to ready (s)" \
  "second boot to ready (s)" "GET / through nginx (req/s)" "GET /api/posts through nginx (req/s)" \
  "GET /posts through nginx (req/s)" "GET /api/posts / GET / (%)" "POST /api/posts through nginx (req/s)" \
  "  of which 201 Created (req/s)"; do
  [ -n "${results[$metric]:-}" ] || continue
  read -r -a values <<<"${results[$metric]}"
  sorted=$(printf '%s\n' "${values[@]}" | sort -g)
  n=${#values[@]}
  median=$(echo "$sorted" | sed -n "$(( (n + 1) / 2 ))p")
  printf '%-36s %10s %10s %10s %5s\n' "$metric" "$median" "$(echo "$sorted" | head -1)" "$(echo "$sorted" | tail -1)" "$n"
done
echo "(machine: $(nproc) cores, QEMU accel as imagebuild boot chose it; time is noisy here, compare min and max)"
