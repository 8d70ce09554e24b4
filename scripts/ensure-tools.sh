#!/usr/bin/env bash
# Install the host tools the scripts and their tests use (socat, openssl, curl) when missing.
# Usage: scripts/ensure-tools.sh [EXTRA_TOOL ...]   (e.g. wrk for make bench)
set -euo pipefail

missing=()
for tool in socat openssl curl "$@"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing tools: ${missing[*]} (install them with your package manager)" >&2
  exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null
