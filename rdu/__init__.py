"""rdu-emulator: one import namespace for the whole distribution.

The folders of the repository are the design card (see docs/architecture.md); installed, each is
a subpackage of `rdu`, so the project adds one top-level name to an environment:

    rdu.base, rdu.yaml_io   user errors, typed field parsing, units, YAML reading (rdu/)
    rdu.protos              .proto files and their generated modules (protos/)
    rdu.interconnect        links, topologies, collectives, the gRPC data plane (interconnect/)
    rdu.socket_actor        one socket: tiers, cost model, numerics, its Ray actor (socket_actor/)
    rdu.scheduler           the serving engines, policies, workloads, metrics (scheduler/)
    rdu.node                clusters and backends, runs, observers, studies, the CLI (node/)
"""
