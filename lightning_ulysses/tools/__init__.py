"""Command-line tools behind ``lightning-ulysses <tool>``: :mod:`.compare` (two runs' metrics step by step)."""
