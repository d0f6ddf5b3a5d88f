"""Training over several processes: data parallelism (one all-reduce of the clipped sums per
logical batch) and fully_shard (FSDP2) models (clipped sums reduce-scattered to their shards)."""
