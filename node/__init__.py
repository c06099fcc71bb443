"""The top layer: platforms, launching on a laptop or a cluster, the CLI, the dashboard.

Ray reads some settings when it is first imported, so the project's defaults for them are set
here, before any module of this package can import Ray: no usage statistics, token
authentication stated explicitly (quiet), gRPC logging at errors only. The user's own
environment variables win.
"""

import os as _os

for _name, _value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "token"), ("GRPC_VERBOSITY", "ERROR")):
    _os.environ.setdefault(_name, _value)
