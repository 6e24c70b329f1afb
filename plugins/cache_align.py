"""cache_align plugin (being written)."""
