"""Backend health: rise/fall trackers, active probes, the per-pool checker, the custom_load agent poller."""
