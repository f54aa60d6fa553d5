#!/usr/bin/env bash
# Benchmarks. Each prints figures as ratios against a baseline measured in
# the same run. Usage:
#   scripts/bench.sh [volume-upload|sandbox-create|hydrate|phase2|load|microvm|envd-unpack|all]
# `phase2` runs on the runtime SANDBOX_TEST_RUNTIME names (namespace by default).
# `load` takes LOAD_CLIENTS (default 8) and LOAD_SECONDS (default 60).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
scripts/postgres.sh
scripts/garage.sh start >/dev/null
cargo build --release -q -p sandbox-manager -p bench -p envd
export SANDBOX_MANAGER_BIN=$CARGO_TARGET_DIR/release/sandbox-manager
what=${1:-all}
bench=$CARGO_TARGET_DIR/release/sandbox-bench
for name in volume-upload sandbox-create hydrate phase2; do
  if [[ $what == "$name" || $what == all ]]; then
    echo; "$bench" "$name"
  fi
done
if [[ $what == load || $what == all ]]; then
  echo; "$bench" load --clients "${LOAD_CLIENTS:-8}" --seconds "${LOAD_SECONDS:-60}"
fi
if [[ $what == microvm || $what == all ]]; then
  scripts/microvm-deps.sh
  echo; SANDBOX_TEST_RUNTIME=microvm "$bench" microvm
fi
if [[ $what == envd-unpack || $what == all ]]; then
  echo; ENVD_BIN=$CARGO_TARGET_DIR/release/envd cargo run --release -q -p envd --example unpack_bench
fi
