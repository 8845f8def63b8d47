#!/usr/bin/env bash
# Print balancer NODE's halb.toml for the Vagrant cluster, made by the generator the namespace lab uses
# (halb.cluster_config through `halb lab config`). lb.sh runs it; so does tests/unit/test_vagrant.py.
#
# Usage: node-config.sh NODE INTERFACE
#   INTERFACE    the private-network interface: VRRP runs there and the VIP goes there
#   environment: HALB_SUBNET HALB_LBS HALB_BACKENDS (set by the Vagrantfile), HALB_PYTHON (the python
#                that has halb; default /opt/halb/bin/python)
set -euo pipefail
node=${1:?usage: node-config.sh NODE INTERFACE}
interface=${2:?usage: node-config.sh NODE INTERFACE}

# --prefix vagrant: never pick up the config of a namespace lab that happens to run on the same machine
exec "${HALB_PYTHON:-/opt/halb/bin/python}" -m halb lab config "$node" --prefix vagrant \
  --lbs "${HALB_LBS:?}" --backends "${HALB_BACKENDS:?}" --subnet "${HALB_SUBNET:?}" \
  --vrrp --vrrp-interface "$interface"
