#!/usr/bin/env bash
# End-to-end comparison: pgbench -S through pgmtls vs directly against the same PostgreSQL doing
# TLS with client-certificate auth, alternating A B A B in one run, printing the TPS ratio.
#
#   benches/e2e.sh [--rounds N] [--duration S] [--clients C] [--scale N]
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl, pgbench, psql) and openssl. Runs on
# loopback only, in a mktemp dir it removes on exit. As root, Postgres runs as `postgres`.
# Absolute TPS depends on the machine's load; quote the ratio.
set -euo pipefail

rounds=3 duration=10 clients=8 scale=10
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
bindir=${PGMTLS_PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[[ -x $bindir/initdb ]] || { echo "PostgreSQL server binaries not found (apt-get install postgresql, or set PGMTLS_PG_BINDIR)" >&2; exit 1; }

(cd "$repo" && cargo build --release --quiet)
bin=$repo/target/release/pgmtls

work=$(mktemp -d /tmp/pgmtls-e2e.XXXXXX)
as_pg=()
if [[ $(id -u) == 0 ]]; then as_pg=(runuser -u postgres --); chown postgres "$work"; fi
proxy_pid=
cleanup() {
  [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null && wait "$proxy_pid" 2>/dev/null || true
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# PKI: one CA for the server and client certificates, ECDSA P-256.
pki=$work/pki; mkdir -p "$pki"
cat >"$pki/ext.cnf" <<'EXT'
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EXT
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
key "$pki/ca.key"
openssl req -x509 -new -key "$pki/ca.key" -days 2 -subj "/CN=e2e-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$pki/ca.crt" 2>/dev/null
for who in server client; do
  key "$pki/$who.key"
  cn=localhost; [[ $who == client ]] && cn=bench
  openssl req -new -key "$pki/$who.key" -subj "/CN=$cn" -out "$pki/$who.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$who.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$pki/ext.cnf" -extensions "$who" -out "$pki/$who.crt" 2>/dev/null
done
[[ ${#as_pg[@]} -gt 0 ]] && chown -R postgres "$pki"
# libpq (the client) runs as root here and wants its key private too.
cp "$pki/client.key" "$work/client.key"; chmod 600 "$work/client.key"

pg_port=$(free_port)
"${as_pg[@]}" "$bindir/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
port = $pg_port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = 200
fsync = off
synchronous_commit = off
ssl = on
ssl_cert_file = '$pki/server.crt'
ssl_key_file = '$pki/server.key'
ssl_ca_file = '$pki/ca.crt'
CONF
cat >"$work/data/pg_hba.conf" <<'HBA'
local all all trust
hostssl all bench 127.0.0.1/32 cert
host all all 127.0.0.1/32 trust
HBA
"${as_pg[@]}" "$bindir/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
"$bindir/psql" -h "$work" -p "$pg_port" -U postgres -qc "CREATE ROLE bench LOGIN" -c "CREATE DATABASE bench OWNER bench"
"$bindir/pgbench" -h 127.0.0.1 -p "$pg_port" -U bench -i -s "$scale" -q bench >/dev/null 2>&1

"$bin" serve --listen 127.0.0.1:0 --upstream "127.0.0.1:$pg_port" --cert "$pki/server.crt" \
  --key "$pki/server.key" --client-ca "$pki/ca.crt" --allow 127.0.0.1/32 --admin-listen off \
  >"$work/proxy.out" 2>"$work/proxy.log" &
proxy_pid=$!
for _ in $(seq 1 300); do grep -q '^pgmtls: ready' "$work/proxy.out" && break; sleep 0.1; done
proxy_port=$(sed -n 's/^pgmtls: listening database=.* addr=127.0.0.1:\([0-9]*\)$/\1/p' "$work/proxy.out")
[[ -n $proxy_port ]] || { cat "$work/proxy.log"; exit 1; }

run() { # target port -> tps
  PGHOST=127.0.0.1 PGPORT=$2 PGUSER=bench PGDATABASE=bench PGSSLMODE=verify-ca PGGSSENCMODE=disable \
  PGSSLCERT=$pki/client.crt PGSSLKEY=$work/client.key PGSSLROOTCERT=$pki/ca.crt \
    "$bindir/pgbench" -n -S -c "$clients" -j 2 -T "$duration" 2>/dev/null |
    sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}

echo "pgbench -n -S -c $clients -j 2 -T $duration, $rounds rounds, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-6s %12s %12s %8s\n' round direct_tps pgmtls_tps ratio
ratios=()
for r in $(seq 1 "$rounds"); do
  d=$(run direct "$pg_port"); p=$(run pgmtls "$proxy_port")
  ratio=$(python3 -c "print(f'{$p/$d:.3f}')")
  ratios+=("$ratio")
  printf '%-6s %12s %12s %8s\n' "$r" "$d" "$p" "$ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
echo "median pgmtls/direct TPS ratio: $median"
