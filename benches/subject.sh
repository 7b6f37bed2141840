#!/usr/bin/env bash
# keygate as the subject of ../shared/bench/anchors.sh (SUBJECT_CMD).
#
# anchors.sh exports SUBJECT_PORT, UPSTREAM_PORT, KEYS_TSV (token<TAB>key_id
# lines, tokens of another system's shape) and WORKDIR, and runs this under
# `taskset -c 0`. We import the keys with `keygate apikey import` (as an
# operator migrating keys would), spread over owners so the per-owner cap
# holds, then exec keygate with every data-plane feature on: hashing,
# constant-time compare, cache, identity headers, metrics, access log at its
# default level (info).
set -euo pipefail
BIN=${KEYGATE_BIN:?KEYGATE_BIN must point at a release build of keygate}
DIR="$WORKDIR/keygate"
mkdir -p "$DIR"
ADMIN_PORT=$((SUBJECT_PORT + 10))
PREP_PORT=$((SUBJECT_PORT + 11))
PER_OWNER=${PER_OWNER:-9000}

write_config() { # proxy-port admin-port
  cat >"$DIR/$3" <<CONF
[proxy]
listen = "127.0.0.1:$1"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
[admin]
listen = "127.0.0.1:$2"
[store]
url = "sqlite://$DIR/keygate.db"
[keys]
accept_imported = true
[log]
level = "${KEYGATE_LOG_LEVEL:-info}"
CONF
}
write_config "$SUBJECT_PORT" "$ADMIN_PORT" keygate.toml
write_config "$PREP_PORT" "$((PREP_PORT + 1))" prep.toml

ADMIN_KEY=$("$BIN" bootstrap --email bench-admin@example.com --config "$DIR/keygate.toml")
export KEYGATE_API_KEY=$ADMIN_KEY KEYGATE_SERVER="http://127.0.0.1:$((PREP_PORT + 1))"

# A short-lived instance to create the owners through the admin API.
"$BIN" serve --config "$DIR/prep.toml" >"$DIR/prep.log" 2>&1 &
PREP=$!
trap 'kill "$PREP" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf "$KEYGATE_SERVER/readyz" >/dev/null && break
  sleep 0.1
done
# The per-owner cap stays enforced; raise it to its highest allowed value.
"$BIN" account update --max-keys-per-owner 10000 >/dev/null
# Owners of PER_OWNER keys each, then one import of every key, each line
# naming its owner (token<TAB>name<TAB>owner-email).
LINES=$(wc -l <"$KEYS_TSV")
OWNERS=$(((LINES + PER_OWNER - 1) / PER_OWNER))
for i in $(seq 0 $((OWNERS - 1))); do
  "$BIN" user create --email "owner$i@bench.example.com" --role developer >/dev/null
done
awk -v per="$PER_OWNER" 'BEGIN { FS = OFS = "\t" } { print $1, $2, "owner" int((NR - 1) / per) "@bench.example.com" }' \
  "$KEYS_TSV" >"$DIR/import.tsv"
"$BIN" apikey import --config "$DIR/keygate.toml" --owner-email bench-admin@example.com \
  --duration 30d --tsv "$DIR/import.tsv" 2>>"$DIR/import.log"
i=$OWNERS
kill "$PREP"; wait "$PREP" 2>/dev/null || true
trap - EXIT
echo "imported $(wc -l <"$KEYS_TSV") keys for $i owners" >&2
# PREPARE_ONLY=1: leave the store and config ready, do not serve.
[ -n "${PREPARE_ONLY:-}" ] && exit 0
# In a session of its own, as nginx (the anchor and the upstream) puts
# itself by daemonizing. anchors.sh starts the subject in its own session,
# which wrk also runs in; with the kernel's autogroup scheduling
# (/proc/sys/kernel/sched_autogroup_enabled = 1) a session's processes share
# one CPU weight across cores, so a busy subject on core 0 cut wrk's share of
# core 1 against the upstream nginx: the upstream took 53% of core 1 instead
# of 47%, and wrk sent ~12% fewer requests, whatever the subject's own speed
# (measured 2026-11-24; HAProxy, which anchors.sh starts in the foreground
# in that same session, is handicapped the same way). setsid keeps the pid,
# which anchors.sh watches and kills.
exec setsid "$BIN" serve --config "$DIR/keygate.toml"
