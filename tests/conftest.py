"""Shared fixtures. Ray-free tests need nothing; Ray tests share one session-wide local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
