#!/usr/bin/env bash
# One benchmark target made of pgmtls in front of a plaintext, loopback-only PgBouncer in
# session mode: the deployment for clients that open a connection per request (pgbench -C),
# where forking a Postgres backend per connection costs more than all the TLS together.
# Started by the shared harness as a `cmd:` target; reads its BENCH_* variables. The
# harness sums CPU over this script's process tree, so PgBouncer's CPU counts as pgmtls'.
#
#   run.sh --scenario connect --target direct \
#     --target 'pgmtls_pgb=cmd:benches/pgbouncer_behind.sh'
#
# Needs pgbouncer (apt-get install pgbouncer), python3, root (PgBouncer runs as `postgres`).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
users=${PGMTLS_BENCH_USERS:-bench}
work=$(mktemp -d /tmp/pgmtls-pgbouncer.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/pgbouncer.ini" <<INI
[databases]
* = host=${BENCH_UPSTREAM_HOST} port=${BENCH_UPSTREAM_PORT}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
logfile = $work/pgbouncer.log
pidfile = $work/pgbouncer.pid
; pgmtls has checked the client certificate and the allowlist; PgBouncer only pools.
auth_type = trust
auth_file = $work/userlist.txt
pool_mode = session
server_reset_query = DISCARD ALL
max_client_conn = 5000
default_pool_size = 100
log_connections = 0
log_disconnections = 0
stats_period = 3600
INI
for u in $users; do echo "\"$u\" \"\""; done >"$work/userlist.txt"
chown -R postgres "$work"

pids=()
stop() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
  rm -rf "$work"
}
trap 'stop; exit 0' TERM INT

(ulimit -n 19000
 exec setpriv --reuid=postgres --regid="$(id -g postgres)" --init-groups -- \
   pgbouncer "$work/pgbouncer.ini") &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

"$repo/target/release/pgmtls" serve --listen "$BENCH_LISTEN_ADDR" --upstream "127.0.0.1:$port" \
  --cert "$BENCH_TLS_CERT" --key "$BENCH_TLS_KEY" --client-ca "$BENCH_TLS_CA" \
  --allow "$BENCH_ALLOW_CIDR" --admin-listen off &
pids+=($!)
wait -n || true
stop
