#!/usr/bin/env bash
# Runs the whole test suite on this machine: starts (installing if needed)
# Postgres and a single-node Garage, sets up the Declaw SDK venv, then runs
# the Rust tests (unit, conformance, black-box) and the Python SDK tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
VENV=${SANDBOX_MANAGER_VENV:-/var/tmp/sandbox-manager-venv}

step() { printf '\n==> %s\n' "$*"; }

step "services: Postgres and Garage"
scripts/postgres.sh
scripts/garage.sh start >/dev/null

step "Python venv with the Declaw SDK ($VENV)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt

step "namespace runtime prerequisites: mmdebstrap (templates), e2fsprogs (disk quotas)"
scripts/namespace-deps.sh

step "microVM prerequisites: QEMU from bookworm-backports, kernel source"
scripts/microvm-deps.sh

step "docker-compose.yml is valid"
# --no-install-recommends: the validator only, not a Docker engine,
# containerd, runc and criu (recommends) that nothing here uses.
if ! command -v docker-compose >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
# The compose file takes its secrets from .env (never committed).
scripts/compose-env.sh 2>/dev/null
docker-compose -f docker-compose.yml config -q

step "Rust tests"
cargo build -p sandbox-manager -p envd
cargo test --workspace

# The sandbox suites again on real VMs. The first run builds the guest
# kernel (~4 min on 2 cores) and each template's image and snapshot; all
# are cached under /var/tmp and rebuilt only when an input changes.
step "microVM guest kernel, images and snapshots"
SANDBOX_MANAGER__RUNTIME__KIND=microvm \
SANDBOX_MANAGER__RUNTIME__TEMPLATES_DIR=${SANDBOX_TEMPLATES_DIR:-/var/tmp/sandbox-manager-templates} \
SANDBOX_MANAGER__RUNTIME__MICROVM__IMAGES_DIR=${SANDBOX_IMAGES_DIR:-/var/tmp/sandbox-manager-images} \
  "$CARGO_TARGET_DIR/debug/sandbox-manager" images build

step "Rust sandbox suites on microVMs"
# --nocapture: SKIP lines (and the accelerator in use) stay visible.
SANDBOX_TEST_RUNTIME=microvm cargo test -p sandbox-manager --test api -- \
  sandboxes:: hydration:: layers:: microvm:: escape:: writeback:: pause:: pty:: templates:: snapshots:: --include-ignored --nocapture

step "Python and JS SDK tests"
SANDBOX_MANAGER_BIN=$CARGO_TARGET_DIR/debug/sandbox-manager "$VENV/bin/python" -m pytest -q -rs tests/python

step "Python and JS SDK tests on microVMs"
SANDBOX_TEST_RUNTIME=microvm SANDBOX_MANAGER_BIN=$CARGO_TARGET_DIR/debug/sandbox-manager \
  "$VENV/bin/python" -m pytest -q -rs tests/python
