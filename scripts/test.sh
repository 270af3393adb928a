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
# They are read from CES_AS3_SCHEMA_DIR, else from ../shared/as3-schema beside the repository (README, "Two commands").
if [ -z "${CES_AS3_SCHEMA_DIR:-}" ] && [ -f "$PWD/../shared/as3-schema/as3-schema-3.29.0-3.json" ]; then
  export CES_AS3_SCHEMA_DIR="$PWD/../shared/as3-schema"
fi
for f in as3-schema-3.28.0-3.json as3-schema-3.29.0-3.json as3-schema-3.56.0-10.json; do
  if [ ! -f "${CES_AS3_SCHEMA_DIR:-/nonexistent}/$f" ]; then
    echo "scripts/test.sh: F5's AS3 schema file $f was not found: put the files in a folder and set CES_AS3_SCHEMA_DIR (README, \"Two commands\", says where to get them)" >&2
    exit 1
  fi
done
exec cargo test --workspace "$@"
