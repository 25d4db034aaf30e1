#!/usr/bin/env bash
# Writes the seed inputs of every fuzz target into fuzz/corpus/NAME/: wire messages as the
# tests send them, the example configs, and state files made by the real CLI (so the seeds
# are what pgmtls writes, certificates and CRLs included). Run from the repository root with
# a built binary: `cargo build && fuzz/seed_corpus.sh [path/to/pgmtls]`; then fuzz, and
# minimize with `cargo fuzz cmin NAME` before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-${CARGO_TARGET_DIR:-target}/debug/pgmtls}
c=fuzz/corpus
mkdir -p "$c"/{negotiation,backend_messages,proxy_header,process_config,database_yaml,ip_rules,trusted_ips,certificate_record,crl,certificate,state_records,peer_message,registry_entry}

seed() { printf "$2" >"$c/$1/seed-$3"; }

# Pre-TLS negotiation: SSLRequest, GSSENCRequest, CancelRequest (3.0 key and a 3.2 long key),
# StartupMessage (3.0 and 3.2), and a TLS ClientHello's first bytes (direct TLS).
seed negotiation '\0\0\0\x08\x04\xd2\x16\x2f' ssl
seed negotiation '\0\0\0\x08\x04\xd2\x16\x30' gssenc
seed negotiation '\0\0\0\x10\x04\xd2\x16\x2e\0\0\x30\x39\xde\xad\xbe\xef' cancel30
seed negotiation '\0\0\0\x2c\x04\xd2\x16\x2e\0\0\x30\x39abcdefghijklmnopqrstuvwxyz012345' cancel32
seed negotiation '\0\0\0\x24\0\x03\0\0user\0alice\0database\0orders\0\0' startup30
seed negotiation '\0\0\0\x35\0\x03\0\x02user\0bob\0database\0app\0application_name\0psql\0\0' startup32
seed negotiation '\0\0\0\x17\0\x03\0\0user\0a\0user\0b\0\0' repeated
seed negotiation '\x16\x03\x01\x02\0\x01\0\x01\xfc\x03\x03' tls

# Backend messages of the auth phase: AuthenticationOk, SASL (SCRAM-SHA-256 and -PLUS),
# BackendKeyData, ParameterStatus, ReadyForQuery, ErrorResponse.
seed backend_messages 'R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I' ok
seed backend_messages 'R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0' sasl
seed backend_messages 'R\0\0\0\x0c\0\0\0\x05\x01\x02\x03\x04' md5
seed backend_messages 'K\0\0\0\x0c\0\0\x30\x39\xde\xad\xbe\xefS\0\0\0\x18server_version\x0017.0\0Z\0\0\0\x05I' keydata
seed backend_messages 'E\0\0\0\x24SFATAL\0C28P01\0Mpassword failed\0\0' error
seed backend_messages 'R\0\0\0\x08\0\0\0\x0bR\0\0\0\x08\0\0\0\x0c' sasl_continue

# PROXY protocol: v1 TCP4, TCP6, UNKNOWN; v2 PROXY over IPv4 and IPv6, LOCAL, with a TLV.
seed proxy_header 'PROXY TCP4 203.0.113.7 10.0.0.1 56324 6432\r\n' v1_tcp4
seed proxy_header 'PROXY TCP6 2001:db8::7 2001:db8::1 56324 6432\r\n' v1_tcp6
seed proxy_header 'PROXY UNKNOWN\r\n' v1_unknown
seed proxy_header '\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c\xcb\0\x71\x07\x0a\0\0\x01\xdc\x04\x19\x20' v2_tcp4
seed proxy_header '\r\n\r\n\0\r\nQUIT\n\x21\x21\0\x24\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x07\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\xdc\x04\x19\x20' v2_tcp6
seed proxy_header '\r\n\r\n\0\r\nQUIT\n\x20\0\0\0' v2_local
seed proxy_header '\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x13\xcb\0\x71\x07\x0a\0\0\x01\xdc\x04\x19\x20\x04\0\x04vpce' v2_tlv

# Peer channel: a cancel request (PGMC, version 1, database, pid, secret) and the replies.
seed peer_message 'PGMC\x01\x06orders\0\0\x30\x39\0\x04\xde\xad\xbe\xef' request
seed peer_message 'PGMC\x01\x03app\0\0\0\x01\0\x20abcdefghijklmnopqrstuvwxyz012345' long_key
seed peer_message '\x00' forwarded
seed peer_message '\x02' upstream_failed

# Registry entries as a replica writes them.
seed registry_entry '{"id":"1","version":"0.1.0","revision":42,"peer_addr":"10.0.0.5:6433","started_at":"2026-05-05T12:37:01Z"}' peer
seed registry_entry '{"id":"3f2a9c01b7de","version":"0.1.0","revision":0,"peer_addr":null,"started_at":"2026-05-05T12:37:01+02:00"}' nopeer

# pgmtls.yaml: the examples, and the etcd form.
for f in config/*.yaml; do cp "$f" "$c/process_config/seed-$(basename "$f")"; done
cat >"$c/process_config/seed-etcd.yaml" <<'EOF'
etcd:
  endpoints: [http://127.0.0.1:2379]
  prefix: /pgmtls
admin_listen: 127.0.0.1:0
replica_id: 2
peer_listen: 127.0.0.1:0
proxy_protocol_from: [10.0.0.0/16, "2001:db8::/48"]
keepalive: {idle: 60s, interval: 10s, count: 6}
EOF

# State files, from the CLI.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PGMTLS_STATE_DIR=$tmp/state HOME=$tmp USER=seed
"$bin" mtls create orders --listen 127.0.0.1:16432 --upstream 127.0.0.1:5432 \
  --server-name orders.db.internal --confirm orders >/dev/null
"$bin" mtls create app --listen 127.0.0.1:16433 --upstream 10.0.0.9:5432 --upstream-tls require \
  --key-type rsa2048 --user-must-match-cn --common-name app_rw --confirm app >/dev/null
"$bin" ip-rules create orders --cidr 203.0.113.7/32 --description "My Office IP" >/dev/null
"$bin" ip-rules create orders --cidr 2001:db8::/48 >/dev/null
"$bin" trusted-ips create orders --cidr 10.20.0.0/16 --description "VPC peering" >/dev/null
"$bin" trusted-ips create orders --cidr 2001:db8:1::/64 >/dev/null
"$bin" certificates create orders --valid-for 90d --common-name reporting >/dev/null
id=$("$bin" certificates create orders --key-type p384 --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1)
"$bin" certificates revoke orders --id "$id" >/dev/null
for db in orders app; do
  d=$PGMTLS_STATE_DIR/databases/$db
  cp "$d/database.yaml" "$c/database_yaml/seed-$db.yaml"
  [ ! -f "$d/ip-rules.yaml" ] || cp "$d/ip-rules.yaml" "$c/ip_rules/seed-$db.yaml"
  [ ! -f "$d/trusted-ips.yaml" ] || cp "$d/trusted-ips.yaml" "$c/trusted_ips/seed-$db.yaml"
  cp "$d/crl.pem" "$c/crl/seed-$db.pem"
  openssl crl -in "$d/crl.pem" -outform der -out "$c/crl/seed-$db.der"
  for f in server.crt ca.crt; do
    cp "$d/$f" "$c/certificate/seed-$db-$f"
    openssl x509 -in "$d/$f" -outform der -out "$c/certificate/seed-$db-$f.der"
  done
  n=0
  for r in "$d"/certificates/*/certificate.yaml; do
    n=$((n + 1))
    cp "$r" "$c/certificate_record/seed-$db-$n.yaml"
    cp "$(dirname "$r")/client.crt" "$c/certificate/seed-$db-client-$n.crt"
  done
  # The database as etcd holds it: every record under databases/NAME/, keys as the store
  # names them, joined by the separator pgmtls::fuzzing::state_records splits on.
  out=$c/state_records/seed-$db
  : >"$out"
  first=1
  # Private keys stay out of the repository: the parser only requires server.key to be
  # there, so it gets a stand-in, and the CA's and clients' keys are not records it reads.
  while IFS= read -r f; do
    rel=${f#"$PGMTLS_STATE_DIR"/}
    case $rel in */ca.key | */client.key) continue ;; esac
    [ $first = 1 ] || printf '\n--record--\n' >>"$out"
    first=0
    printf '%s\n' "$rel" >>"$out"
    case $rel in
      */server.key) printf -- '-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n' >>"$out" ;;
      *) cat "$f" >>"$out" ;;
    esac
  done < <(find "$d" -type f | sort)
done
