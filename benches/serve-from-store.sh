#!/usr/bin/env bash
# A `cmd:` target for ../shared/bench/run.sh that serves the harness's database from a state
# store instead of quick mode, so the data path can be compared with the state in a directory
# and in etcd:
#
#   ../shared/bench/run.sh --scenario select,connect --target direct \
#     --target 'dir=cmd:benches/serve-from-store.sh dir target/release/pgmtls' \
#     --target 'etcd=cmd:benches/serve-from-store.sh etcd target/release/pgmtls' \
#     --target 'shared=cmd:benches/serve-from-store.sh shared target/release/pgmtls'
#
# The database is made with the CLI (`mtls create`, `ip-rules create`), then its CA, server
# certificate and CRL are replaced by the harness's (the harness's clients hold certificates
# of its own CA). In `etcd` mode a throwaway etcd is started in $BENCH_WORK, the directory is
# imported into it with `state import`, and the proxy follows the prefix like a replica. In
# `shared` mode the database is on the shared listener (`--listen shared`, `shared_listen` at
# the harness's address): every connection's ClientHello is read and its SNI looked up before
# the handshake. The harness's clients connect to an IP address, so libpq sends no SNI:
# `default_database` serves them, which takes the same peek and lookup as a named client.
# Runs in the foreground and stops (with its etcd) on SIGTERM, as the harness expects.
set -euo pipefail

mode=${1:?usage: serve-from-store.sh dir|etcd|shared PGMTLS_BIN}
bin=$(realpath "${2:?usage: serve-from-store.sh dir|etcd|shared PGMTLS_BIN}")
: "${BENCH_WORK:?run this from ../shared/bench/run.sh}"
work=$(mktemp -d "$BENCH_WORK/store.XXXXXX")
certs=$(dirname "$BENCH_TLS_CA")
state=$work/state
db=$state/databases/bench

listen=$BENCH_LISTEN_ADDR
[ "$mode" = shared ] && listen=shared
"$bin" mtls create bench --listen "$listen" --server-name bench.db.test \
  --upstream "$BENCH_UPSTREAM_ADDR" --confirm bench --state-dir "$state" >/dev/null 2>&1
"$bin" ip-rules create bench --cidr "$BENCH_ALLOW_CIDR" --state-dir "$state" >/dev/null

# The harness's PKI in place of the one the CLI made. Its first client certificate was issued
# by the CLI's CA, so its record goes too.
rm -rf "$db/certificates"
install -m 0644 "$BENCH_TLS_CA" "$db/ca.crt"
install -m 0600 "$certs/ca.key" "$db/ca.key"
install -m 0644 "$BENCH_TLS_CERT" "$db/server.crt"
install -m 0600 "$BENCH_TLS_KEY" "$db/server.key"
mkdir -p "$work/crl"
: >"$work/crl/index.txt"
echo 01 >"$work/crl/crlnumber"
cat >"$work/crl/ca.cnf" <<EOF
[ca]
default_ca = d
[d]
database = $work/crl/index.txt
crlnumber = $work/crl/crlnumber
default_md = sha256
default_crl_days = 30
EOF
openssl ca -config "$work/crl/ca.cnf" -gencrl -keyfile "$certs/ca.key" -cert "$BENCH_TLS_CA" \
  -out "$db/crl.pem" 2>/dev/null
chmod 0644 "$db/crl.pem"

case $mode in
dir)
  printf 'state_dir: %s\nadmin_listen: "off"\n' "$state" >"$work/pgmtls.yaml"
  exec "$bin" serve --config "$work/pgmtls.yaml"
  ;;
shared)
  printf 'state_dir: %s\nadmin_listen: "off"\nshared_listen: %s\ndefault_database: bench\n' \
    "$state" "$BENCH_LISTEN_ADDR" >"$work/pgmtls.yaml"
  exec "$bin" serve --config "$work/pgmtls.yaml"
  ;;
etcd)
  etcd_bin=${PGMTLS_ETCD_BIN:-$(command -v etcd || echo /usr/bin/etcd)}
  [ -x "$etcd_bin" ] || { echo "etcd not found: apt-get install etcd-server" >&2; exit 1; }
  port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
  client=$(port)
  peer=$(port)
  "$etcd_bin" --name bench --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 &
  etcd_pid=$!
  trap 'kill "$etcd_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 100); do
    grep -q "serving client" "$work/etcd.log" && break
    sleep 0.1
  done
  "$bin" state import --state-dir "$state" --etcd-endpoints "http://127.0.0.1:$client" \
    --etcd-prefix /bench >/dev/null
  printf 'etcd:\n  endpoints: [http://127.0.0.1:%s]\n  prefix: /bench\nadmin_listen: "off"\n' \
    "$client" >"$work/pgmtls.yaml"
  "$bin" serve --config "$work/pgmtls.yaml" &
  proxy_pid=$!
  trap 'kill -TERM "$proxy_pid" 2>/dev/null || true' TERM INT
  status=0
  wait "$proxy_pid" || status=$?
  # A trapped signal interrupts the first wait; wait again for the proxy to finish draining.
  wait "$proxy_pid" 2>/dev/null || true
  exit "$status"
  ;;
*)
  echo "mode must be dir, etcd or shared, not $mode" >&2
  exit 2
  ;;
esac
