"""Links, topologies, collectives and the gRPC data plane. Knows nothing of sockets."""
