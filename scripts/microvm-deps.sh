#!/usr/bin/env bash
# Installs what the microVM runtime needs on a Debian bookworm host:
# QEMU 10 from bookworm-backports (bookworm's own 7.2 conflicts with the
# preinstalled backports qemu-utils), nftables (the guests' egress policy),
# iproute2 (the egress tests' network-namespace hosts) and what the guest
# kernel build needs. Idempotent: a second run only checks.
set -euo pipefail

want=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
build=(linux-source-6.1 bc flex bison libelf-dev xz-utils e2fsprogs make gcc nftables iproute2)

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=("${want[@]}")
for p in "${build[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# Add bookworm-backports to the machine's own Debian source (same URIs, so a
# mirror or snapshot pin set up by the operator keeps applying).
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ]; then
    uris=$(awk '/^URIs:/ && /debian$|debian\/$/ {print $2; exit}' "$src")
  fi
  uris=${uris:-http://deb.debian.org/debian}
  cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! command -v qemu-system-x86_64 >/dev/null; then
  apt-get install -y -qq -t bookworm-backports --no-install-recommends "${want[@]}" >/dev/null
fi
apt-get install -y -qq --no-install-recommends "${build[@]}" >/dev/null
