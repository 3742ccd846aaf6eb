"""The coordinator on Flower's deployment engine: its SuperLink, its sites' keys, its runs."""
