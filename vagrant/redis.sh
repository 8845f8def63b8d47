#!/usr/bin/env bash
# Redis for sessions and rate limits: Debian's redis-server, reachable from the private network.
# Usage (from the Vagrantfile, after common.sh): redis.sh NODE ADDRESS
set -euo pipefail
address=${2:?usage: redis.sh NODE ADDRESS}
export DEBIAN_FRONTEND=noninteractive

apt-get install -y -qq --no-install-recommends redis-server >/dev/null

# Listen on loopback and the private address only, never on the provider's NAT interface. Redis 7
# refuses every non-loopback client without a password while protected-mode is on, even with an
# explicit bind; halb has no Redis password setting yet, so it is off, and the bind is the fence.
cat >/etc/redis/halb.conf <<CONF
bind 127.0.0.1 -::1 $address
protected-mode no
CONF
chown redis:redis /etc/redis/halb.conf
# Redis keeps the last value of a setting: the include goes at the end of Debian's redis.conf.
grep -qx 'include /etc/redis/halb.conf' /etc/redis/redis.conf ||
  echo 'include /etc/redis/halb.conf' >>/etc/redis/redis.conf

# binding the private address needs it to be there
install -d /etc/systemd/system/redis-server.service.d
cat >/etc/systemd/system/redis-server.service.d/halb.conf <<'UNIT'
[Unit]
Wants=network-online.target
After=network-online.target
UNIT
systemctl daemon-reload
systemctl enable redis-server.service
systemctl restart redis-server.service
echo "redis: listening on $address:6379"
