"""One run: its configuration, its execution on a backend, its run directory, signals and streams."""
