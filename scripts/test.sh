#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (the nftables gateway's tests send
# real packets through network namespaces: nftables, iproute2, iputils-ping), then runs every test.
# Needs root, as the network-namespace tests do; without it, it stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the gateway tests build network namespaces and load nftables rules: run as root" >&2
  exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
exec cargo test --workspace "$@"
