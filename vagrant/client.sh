#!/usr/bin/env bash
# The client: curl and the halb CLI (both from common.sh), and `halb-status`, which shows every
# balancer side by side.
# Usage (from the Vagrantfile, after common.sh): client.sh NODE ADDRESS
set -euo pipefail

admins=""
for lb in ${HALB_LB_ADDRESSES:?}; do
  admins="$admins --admin $lb:9901"
done
cat >/usr/local/bin/halb-status <<SCRIPT
#!/bin/sh
# every balancer of the Vagrant cluster side by side; extra arguments (e.g. --json) go to halb status
exec /opt/halb/bin/halb status$admins "\$@"
SCRIPT
chmod 0755 /usr/local/bin/halb-status
echo "client: try  curl http://${HALB_VIP:?}/  and  halb-status"
