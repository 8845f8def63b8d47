#!/usr/bin/env bash
# A web backend: `halb demo-backend NODE` on port 80 (answers every request with its name).
# Usage (from the Vagrantfile, after common.sh): web.sh NODE ADDRESS
set -euo pipefail
node=${1:?usage: web.sh NODE ADDRESS}
address=${2:?usage: web.sh NODE ADDRESS}

cat >/etc/systemd/system/halb-web.service <<UNIT
[Unit]
Description=halb demo backend $node
After=network.target

[Service]
ExecStart=/opt/halb/bin/halb demo-backend $node --listen 0.0.0.0:80
Restart=on-failure
RestartSec=1
# no state and no privileges: a throw-away user that may bind port 80
DynamicUser=yes
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable halb-web.service
systemctl restart halb-web.service
echo "web: $node answering on http://$address/"
