#!/usr/bin/env bash
# The main job on the embedded example, for real: installs what the lab needs (nftables, iproute2, iputils-ping from
# Debian) if it is missing, then runs `ces lab --example`: the example's policy on a real nftables gateway in network
# namespaces, real packets from every pod, each real outcome next to simulate's prediction. Needs root (Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/lab.sh: the lab builds network namespaces and loads nftables rules: run as root" >&2
  echo "  (without root: cargo run -p ces -- simulate --example --from payments/checkout-0 --to api.stripe.com:443/tcp)" >&2
  exit 1
fi
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/lab.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
exec cargo run -q -p ces -- lab --example "$@"
