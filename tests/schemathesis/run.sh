#!/usr/bin/env bash
# Fuzzes keygate's admin API against its own OpenAPI document with
# schemathesis: no 5xx (not_a_server_error) and every response conforming to
# the documented schema (status code, content type, body). Self-contained:
# installs schemathesis (PyPI) if missing, builds and starts the real binary
# on a fresh SQLite file with a bootstrap admin, runs a bounded fuzz, stops
# keygate, and exits non-zero on any failure. Runs from anywhere.
#
#   tests/schemathesis/run.sh                    # bounded: 25 examples per operation
#   MAX_EXAMPLES=500 tests/schemathesis/run.sh   # longer
set -euo pipefail
cd "$(dirname "$0")/../.."

MAX_EXAMPLES="${MAX_EXAMPLES:-25}"

if ! command -v schemathesis >/dev/null 2>&1; then
  python3 -m pip install --quiet 'schemathesis>=4,<5'
fi

cargo build --quiet --bin keygate
KEYGATE="$(pwd)/target/debug/keygate"

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
proxy_port="$(free_port)"
admin_port="$(free_port)"
cat > "$work/keygate.toml" <<TOML
[proxy]
listen = "127.0.0.1:${proxy_port}"
upstream = "http://127.0.0.1:9"
[admin]
listen = "127.0.0.1:${admin_port}"
[store]
url = "sqlite://${work}/keygate.db"
TOML

# A fresh keygate (new SQLite file, new bootstrap admin) for each pass.
start_keygate() {
  pass="$1"
  mkdir -p "$work/$pass"
  sed "s#${work}/keygate.db#${work}/${pass}/keygate.db#" "$work/keygate.toml" >"$work/$pass/keygate.toml"
  token="$("$KEYGATE" bootstrap --email schemathesis@example.com --config "$work/$pass/keygate.toml")"
  "$KEYGATE" serve --config "$work/$pass/keygate.toml" >>"$work/keygate.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:${admin_port}/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "keygate did not start" >&2
  return 1
}
stop_keygate() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}

fuzz() {
  # From the scratch directory: schemathesis keeps its example database in
  # ./.schemathesis, which does not belong in the repository.
  (cd "$work" && schemathesis run "http://127.0.0.1:${admin_port}/api/v1/openapi.json" \
    --url "http://127.0.0.1:${admin_port}" \
    --header "Authorization: Bearer ${token}" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --seed 1 \
    --request-timeout 10 \
    --continue-on-failure \
    --workers 1 \
    --report junit --report-dir "$work/report" \
    "$@")
}

# Some operations can lock the fuzzer's own admin key out (disable, rotate
# or delete it, disable or delete its user, switch API keys off account-wide),
# after which every call is a 401 and tests nothing. So: everything else in
# one stateful pass, then each of those alone on a fresh keygate.
LOCKOUT='/(disable|rotate)$|^/api/v1/(users|service-accounts)/\{id\}/update$|^/api/v1/account/settings'
status=0
start_keygate main
fuzz --exclude-path-regex "$LOCKOUT" --exclude-method DELETE || status=$?
stop_keygate
n=0
for selector in \
  "--include-method DELETE" \
  "--include-path-regex /disable$" \
  "--include-path-regex /rotate$" \
  "--include-path-regex ^/api/v1/users/\{id\}/update$" \
  "--include-path-regex ^/api/v1/service-accounts/\{id\}/update$" \
  "--include-path-regex ^/api/v1/account/settings"; do
  n=$((n + 1))
  start_keygate "pass$n"
  # shellcheck disable=SC2086 # the selector is two words on purpose
  fuzz $selector || status=$?
  stop_keygate
done

if [ "$status" -ne 0 ]; then
  echo "schemathesis found failures (exit $status); keygate's log:" >&2
  grep -E "WARN|ERROR|panicked" "$work/keygate.log" | tail -n 50 >&2 || true
fi
exit "$status"
