"""memoize plugin (being written)."""
