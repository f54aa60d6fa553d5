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
g key info GK5a4d2c6e1f0b9a8c7d6e5f4a >/dev/null 2>&1 || \
  g key import --yes -n sandbox-manager GK5a4d2c6e1f0b9a8c7d6e5f4a \
    3f1e2d4c5b6a79880796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0
g bucket info sandbox-volumes >/dev/null 2>&1 || g bucket create sandbox-volumes
g bucket allow --read --write --owner sandbox-volumes --key GK5a4d2c6e1f0b9a8c7d6e5f4a
