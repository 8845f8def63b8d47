"""`halb lab`: the whole halb cluster on one machine, each host in its own Linux network namespace.

How this works: `topology` (pure) says which hosts exist and their addresses; `netns` makes namespaces, the
switch (a bridge in its own namespace) and the veth cables with the `ip` command; `processes` starts each
host's service detached inside its namespace; `state` records everything in /run/halb-lab/<prefix>/ before
it is created, so `down` can always clean up; `partition` cuts traffic at the switch with nftables;
`control` strings these together and `cli` is the click group `halb lab`. The node configs come from
`halb.cluster_config`, the same generator Vagrant provisioning uses.
"""
