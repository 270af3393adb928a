#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (the nftables gateway's tests send
# real packets through network namespaces: nftables, iproute2, iputils-ping; host names need a real DNS server,
# dnsmasq, and on kernels without nft's `queue`, iptables; flow export needs rsyslog, rsyslog-gnutls and pmacct),
# then runs every test.
# Needs root, as the network-namespace tests do; without it, it stops and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the gateway tests build network namespaces and load nftables rules: run as root" >&2
  exit 1
fi
# shellcheck source=scripts/deps.sh
. scripts/deps.sh
need nft:nftables ip:iproute2 ping:iputils-ping iptables-nft:iptables dnsmasq:dnsmasq-base
# Flow export is tested against real receivers: rsyslog (with TLS) and pmacct's IPFIX collector.
need rsyslogd:rsyslog nfacctd:pmacct
# The web UI is tested in a real browser: Debian's chromium, headless.
need chromium:chromium
need_pkg rsyslog-gnutls
# The official AS3 schema files (F5's, not part of this repository) validate every declaration the tests produce.
if [ -z "${CES_AS3_SCHEMA_DIR:-}" ]; then
  for d in "$PWD/../shared/as3-schema" /work/shared/as3-schema; do
    if [ -f "$d/as3-schema-3.29.0-3.json" ]; then export CES_AS3_SCHEMA_DIR="$d"; break; fi
  done
fi
if [ ! -f "${CES_AS3_SCHEMA_DIR:-/nonexistent}/as3-schema-3.29.0-3.json" ]; then
  echo "scripts/test.sh: the official AS3 schema files (as3-schema-3.29.0-3.json, …) were not found: set CES_AS3_SCHEMA_DIR" >&2
  exit 1
fi
exec cargo test --workspace "$@"
