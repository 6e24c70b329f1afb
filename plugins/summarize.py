"""summarize plugin (being written)."""
