#!/usr/bin/env bash
# Every performance row in one command: builds pgmtls in release mode and runs the shared
# benchmark harness (../shared/bench/run.sh: plaintext ceiling, direct TLS Postgres, PgBouncer,
# stunnel) with pgmtls as one more target, then prints the summary table of ratios.
#
#   benches/compare.sh [run.sh options...]     e.g. --rounds 5 --scenario select,connect
#
# Needs the harness next to this repository (or BENCH_HARNESS=/path/to/run.sh), root, and
# pgbouncer + stunnel4 for those targets (`--target direct` alone works without them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
harness=${BENCH_HARNESS:-$repo/../shared/bench/run.sh}
[[ -x $harness || -f $harness ]] || { echo "benchmark harness not found at $harness (set BENCH_HARNESS)" >&2; exit 1; }
(cd "$repo" && cargo build --release --quiet)
out=$repo/target/bench-results/compare-$(date -u +%Y%m%dT%H%M%SZ)
targets=(--target plain,direct,pgbouncer,stunnel)
for a in "$@"; do [[ $a == --target ]] && targets=(); done
# pgmtls in front of a plaintext PgBouncer (benches/pgbouncer_behind.sh), where it is installed:
# the deployment for clients that connect per request. PGMTLS_BENCH_PGB=0 leaves it out.
ours=(--target 'pgmtls=cmd:target/release/pgmtls serve --listen $BENCH_LISTEN_ADDR --upstream $BENCH_UPSTREAM_ADDR --cert $BENCH_TLS_CERT --key $BENCH_TLS_KEY --client-ca $BENCH_TLS_CA --allow $BENCH_ALLOW_CIDR --admin-listen off')
if [[ ${PGMTLS_BENCH_PGB:-1} != 0 ]] && command -v pgbouncer >/dev/null; then
  ours+=(--target 'pgmtls_pgb=cmd:benches/pgbouncer_behind.sh')
fi
cd "$repo"
bash "$harness" "${targets[@]}" "${ours[@]}" --out "$out" "$@"
cat "$out/summary.md"
