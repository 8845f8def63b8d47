"""The cluster layer: Raft membership (pysyncobj), shared configuration and the VIP quorum lease.

How this works: `state` is the replicated state machine (a plain class with `apply(command)`), `lease` the
pure node-side lease logic, `raft` the thin pysyncobj wrapper that feeds committed commands to the state
on every member, `keeper` runs a `LeaseHolder` against Raft inside the node's event loop, and `sync`
turns the shared pool configuration into the node's runtime pools. The safety argument is in
docs/quorum.md.
"""
