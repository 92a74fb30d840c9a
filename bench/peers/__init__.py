"""Peer optimizers run against the simulated server, for bench_throughput. They run in their own virtual
environment (`scripts/setup_bench_peers.sh`), never in the project's: they import only their own library."""
