"""cascade-routing: routing, cascading and cascade routing among LLMs under a cost budget."""

import os

# torch's OpenMP workers spin-wait between parallel ops by default; with more than one torch thread
# that spinning starves the engine's numba kernels (measured: bench_engine 2 threads 2.1 s with, 0.19 s
# without, at load ~5). Passive waiting is set before torch is imported, unless the user chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
