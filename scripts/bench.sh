#!/usr/bin/env bash
# Benchmarks. Each prints figures as ratios against a baseline measured in
# the same run. Usage: scripts/bench.sh [volume-upload|envd-unpack|all]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/postgres.sh
scripts/garage.sh start >/dev/null
cargo build --release -q -p sandbox-manager -p bench -p envd
export SANDBOX_MANAGER_BIN=$CARGO_TARGET_DIR/release/sandbox-manager
what=${1:-all}
if [[ $what == volume-upload || $what == all ]]; then
  "$CARGO_TARGET_DIR/release/sandbox-bench" volume-upload
fi
