"""`lstm-serve bench`: lstm-serve measured against its ceilings, on one machine, in one run.

raw.py      ONNX Runtime in process (the compute ceiling)
echo.py     the same proto answered without inference (the transport ceiling)
naive.py    the same proto, one ONNX Runtime call per request, state in a dict
servers.py  runs echo, naive or lstm-serve in a subprocess (its CPU and RSS are read from /proc)
loadgen.py  the load generator: worker processes of grpc.aio clients
memory.py   RSS of many idle sessions against the raw bytes of their state
plots.py    the PNG plots; run.py the command itself
procs/      redis-server, lstm-serve replicas and Envoy as real processes (scripts/bench_cluster.py,
            scripts/bench_scaling.py and the cluster tests)
"""
