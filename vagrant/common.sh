#!/usr/bin/env bash
# Every VM: the Debian packages halb needs, and halb itself in a venv at /opt/halb from the synced repo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
apt-get install -y -qq --no-install-recommends python3-venv iproute2 nftables curl >/dev/null

if [ ! -x /opt/halb/bin/python ]; then
  python3 -m venv /opt/halb
fi
# Uninstall first: pip keeps an installed halb of the same version, and /vagrant may have new code.
/opt/halb/bin/pip uninstall -q -y halb
/opt/halb/bin/pip install -q /vagrant
ln -sf /opt/halb/bin/halb /usr/local/bin/halb
echo "common: $(halb --version) in /opt/halb"
