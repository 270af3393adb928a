#!/usr/bin/env bash
# The main job on the embedded example, for real: installs what the lab needs (nftables, iproute2, iputils-ping,
# iptables, dnsmasq from Debian) if it is missing, then runs `ces lab --example`: the example's policy on a real
# nftables gateway in network namespaces, a real DNS server for the example's host names, real packets from every pod,
# each real outcome next to simulate's prediction. Needs root (Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/lab.sh: the lab builds network namespaces and loads nftables rules: run as root" >&2
  echo "  (without root: cargo run -p ces -- simulate --example --from payments/checkout-0 --to api.stripe.com:443/tcp)" >&2
  exit 1
fi
# shellcheck source=scripts/deps.sh
. scripts/deps.sh
# iptables: kernels without nft's `queue` statement hold DNS answers through iptables-nft's NFQUEUE target.
need nft:nftables ip:iproute2 ping:iputils-ping iptables-nft:iptables dnsmasq:dnsmasq-base
exec cargo run -q -p ces -- lab --example "$@"
