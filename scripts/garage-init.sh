#!/bin/sh
# One-shot Garage set-up for docker-compose.yml: layout, key, bucket.
# Idempotent; mirrors what scripts/garage.sh does for the native stack.
set -eu
g() { garage -c /etc/garage.toml "$@"; }
# The daemon's node key is on the shared metadata volume.
until [ -f /var/lib/garage/meta/node_key.pub ]; do sleep 1; done
GARAGE_RPC_HOST=$(g node id -q)
export GARAGE_RPC_HOST
until g status >/dev/null 2>&1; do sleep 1; done
if ! g layout show | grep -q "Current cluster layout version: [1-9]"; then
  node=$(g node id -q | cut -d@ -f1)
  g layout assign -z dc1 -c 10G "$node"
  g layout apply --version 1
fi
# The key comes from .env (scripts/compose-env.sh), never from this file.
: "${GARAGE_KEY_ID:?}" "${GARAGE_SECRET_KEY:?}"
g key info "$GARAGE_KEY_ID" >/dev/null 2>&1 || \
  g key import --yes -n sandbox-manager "$GARAGE_KEY_ID" "$GARAGE_SECRET_KEY"
g bucket info sandbox-volumes >/dev/null 2>&1 || g bucket create sandbox-volumes
g bucket allow --read --write --owner sandbox-volumes --key "$GARAGE_KEY_ID"
