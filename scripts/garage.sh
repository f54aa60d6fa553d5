#!/usr/bin/env bash
# Single-node Garage (S3-compatible object store) on loopback for tests and
# local development. Idempotent: installs Garage if missing, starts it if not
# running, applies a layout, imports a fixed key and creates the buckets.
#
#   scripts/garage.sh start   # (default) ensure running; print S3 settings
#   scripts/garage.sh env     # same, output as KEY=VALUE lines only
#   scripts/garage.sh stop    # stop the daemon (state is kept)
#   scripts/garage.sh resume  # start the daemon again after stop
#
# Settings (env): GARAGE_DIR (state, default /var/tmp/sandbox-manager-garage),
# GARAGE_S3_PORT (3900), GARAGE_RPC_PORT (3901), GARAGE_ADMIN_PORT (3903).
set -euo pipefail

GARAGE_DIR=${GARAGE_DIR:-/var/tmp/sandbox-manager-garage}
S3_PORT=${GARAGE_S3_PORT:-3900}
RPC_PORT=${GARAGE_RPC_PORT:-3901}
ADMIN_PORT=${GARAGE_ADMIN_PORT:-3903}
# Test credentials, fixed so configs can name them; local loopback use only.
KEY_ID=GK5a4d2c6e1f0b9a8c7d6e5f4a
SECRET=3f1e2d4c5b6a79880796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0
BUCKETS=(sandbox-volumes sandbox-volumes-sweep)
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "garage.sh: $*" >&2; }

install_garage() {
  command -v garage >/dev/null && return
  log "installing Garage with cargo (about 10 minutes, once)"
  cargo install --locked garage >&2
}

write_config() {
  mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
  [ -f "$GARAGE_DIR/rpc_secret" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$GARAGE_DIR/rpc_secret"; chmod 600 "$GARAGE_DIR/rpc_secret"; }
  cat > "$GARAGE_DIR/garage.toml" <<TOML
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret_file = "$GARAGE_DIR/rpc_secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
TOML
}

g() { garage -c "$GARAGE_DIR/garage.toml" "$@"; }

running() { [ -f "$GARAGE_DIR/pid" ] && kill -0 "$(cat "$GARAGE_DIR/pid")" 2>/dev/null; }

start_daemon() {
  running && return
  nohup garage -c "$GARAGE_DIR/garage.toml" server >> "$GARAGE_DIR/garage.log" 2>&1 &
  echo $! > "$GARAGE_DIR/pid"
  for _ in $(seq 1 100); do
    g status >/dev/null 2>&1 && return
    sleep 0.1
  done
  log "garage did not come up; log: $GARAGE_DIR/garage.log"; tail -20 "$GARAGE_DIR/garage.log" >&2; exit 1
}

configure() {
  if ! g layout show 2>/dev/null | grep -q "Current cluster layout version: [1-9]"; then
    local node
    node=$(g node id -q 2>/dev/null | cut -d@ -f1)
    g layout assign -z dc1 -c 10G "$node" >/dev/null
    g layout apply --version 1 >/dev/null
  fi
  g key info "$KEY_ID" >/dev/null 2>&1 || g key import --yes -n sandbox-manager "$KEY_ID" "$SECRET" >/dev/null
  for bucket in "${BUCKETS[@]}"; do
    g bucket info "$bucket" >/dev/null 2>&1 || g bucket create "$bucket" >/dev/null
    g bucket allow --read --write --owner "$bucket" --key "$KEY_ID" >/dev/null
  done
  # The S3 API answers once the layout has propagated.
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" && return
    sleep 0.1
  done
}

print_env() {
  cat <<ENV
S3_ENDPOINT=http://127.0.0.1:$S3_PORT
S3_REGION=garage
S3_BUCKET=${BUCKETS[0]}
S3_SWEEP_BUCKET=${BUCKETS[1]}
AWS_ACCESS_KEY_ID=$KEY_ID
AWS_SECRET_ACCESS_KEY=$SECRET
GARAGE_CONFIG=$GARAGE_DIR/garage.toml
ENV
}

case "${1:-start}" in
  start|env)
    install_garage; write_config; start_daemon; configure
    [ "${1:-start}" = start ] && log "Garage is up; S3 settings:"
    print_env ;;
  stop)
    if running; then kill "$(cat "$GARAGE_DIR/pid")"; while running; do sleep 0.1; done; fi ;;
  resume)
    write_config; start_daemon ;;
  *) echo "usage: $0 [start|env|stop|resume]" >&2; exit 2 ;;
esac
