#!/usr/bin/env bash
# Installs what the namespace runtime calls on a Debian-family host:
# mmdebstrap (builds the template root filesystems) and e2fsprogs
# (mkfs.ext4 formats each sandbox's disk-quota image). User namespaces,
# idmapped mounts, seccomp and loop devices come with the kernel; the
# runtime checks them at start and reports what is missing in /health.
# Idempotent: a second run only checks.
set -euo pipefail
missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
[ ${#missing[@]} -eq 0 ] && exit 0
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
