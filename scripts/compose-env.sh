#!/usr/bin/env bash
# Writes .env for docker-compose.yml with fresh secrets (the Garage RPC
# secret and S3 key, the Postgres password), once: an existing .env is kept.
# The compose file refuses to start without it, so no secret is committed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .env ]; then
  echo ".env exists; keeping it" >&2
  exit 0
fi
hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
umask 077
cat > .env <<ENV
GARAGE_RPC_SECRET=$(hex 32)
GARAGE_KEY_ID=GK$(hex 12)
GARAGE_SECRET_KEY=$(hex 32)
POSTGRES_PASSWORD=$(hex 16)
ENV
echo "wrote .env (mode 0600) with fresh secrets" >&2
