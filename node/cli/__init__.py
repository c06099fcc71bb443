"""The `rdu` command: argument parsing and printing only; the work is done by the rooms below."""
