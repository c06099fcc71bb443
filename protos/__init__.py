"""Protocol definitions (`.proto`, the source of truth) and their generated Python modules."""
