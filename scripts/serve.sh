#!/usr/bin/env bash
# Runs the server on the embedded default (SQLite + a local blob directory
# under ./data; no external services). Builds the release binaries, and
# installs mmdebstrap (used to build the sandbox templates) when missing, and
# QEMU when the microVM runtime is asked for.
# Extra arguments go to `sandbox-manager serve`, e.g. --config FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if [ "$(id -u)" = 0 ]; then
  scripts/namespace-deps.sh
elif ! command -v mmdebstrap >/dev/null; then
  echo "serve.sh: sandboxes need root and mmdebstrap (volumes work without them)" >&2
fi
# microVMs need QEMU and the kernel source (the guest kernel is built once,
# in the background, on first start): SANDBOX_MANAGER__RUNTIME__KIND=microvm.
if [ "${SANDBOX_MANAGER__RUNTIME__KIND:-}" = microvm ] && [ "$(id -u)" = 0 ]; then
  scripts/microvm-deps.sh
fi
cargo build --release -q -p sandbox-manager -p envd
exec "$CARGO_TARGET_DIR/release/sandbox-manager" serve "$@"
