#!/usr/bin/env bash
# Install the host tools the scripts and their tests use (socat, openssl, curl) when missing.
# Usage: scripts/ensure-tools.sh [EXTRA_TOOL ...]   (e.g. wrk for make bench)
# As root with apt-get, missing tools are installed; otherwise it lists them and exits 1.
set -euo pipefail

readonly PROG="${0##*/}"
usage() {
  echo "usage: $PROG [-h] [EXTRA_TOOL ...]"
  echo "Install socat, openssl, curl and each EXTRA_TOOL when missing (root with apt-get);"
  echo "otherwise list the missing ones and exit 1."
  echo "  -h, --help  show this help and exit"
}
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    -*) echo "$PROG: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) [[ "$arg" =~ ^[A-Za-z0-9][A-Za-z0-9.+_-]*$ ]] \
         || { echo "$PROG: not a tool name: $arg" >&2; exit 2; } ;;
  esac
done

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
