#!/usr/bin/env bash
# A balancer: /etc/halb/halb.toml from the shared generator, the balancer sysctls, and halb.service.
# Usage (from the Vagrantfile, after common.sh): lb.sh NODE ADDRESS
set -euo pipefail
node=${1:?usage: lb.sh NODE ADDRESS}
address=${2:?usage: lb.sh NODE ADDRESS}

# The interface holding the private address (eth1 with the Debian box; eth0 is the provider's NAT).
interface=$(ip -o -4 addr show to "$address/32" | awk '{ print $2; exit }')
if [ -z "$interface" ]; then
  echo "lb: no interface has $address; is the private network up?" >&2
  exit 1
fi

install -d -m 0755 /etc/halb
bash /vagrant/vagrant/node-config.sh "$node" "$interface" >/etc/halb/halb.toml.new
halb check /etc/halb/halb.toml.new
mv /etc/halb/halb.toml.new /etc/halb/halb.toml

# The same sysctls as the namespace lab's balancers (halb/lab/netns.py LB_SYSCTLS): bind the VIP
# before holding it, and answer ARP only for addresses on the interface that is asked.
cat >/etc/sysctl.d/60-halb.conf <<'CONF'
net.ipv4.ip_nonlocal_bind = 1
net.ipv4.conf.all.arp_ignore = 1
net.ipv4.conf.all.arp_announce = 2
CONF
sysctl -q -p /etc/sysctl.d/60-halb.conf

if ! id halb >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin halb
fi
install -m 0644 /vagrant/vagrant/halb.service /etc/systemd/system/halb.service
systemctl daemon-reload
systemctl enable halb.service
systemctl restart halb.service
echo "lb: $node serving on $address (VRRP interface $interface); admin http://$address:9901/status"
