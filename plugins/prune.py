"""prune plugin (being written)."""
