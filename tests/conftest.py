"""Suite-wide settings.

Ranks forked from the pytest process (the fork launcher) must not inherit a busy OpenMP
thread pool: libgomp is not fork-safe, and a forked child that enters a parallel region
can hang. One intra-op thread everywhere also gives every rank the same reduction order,
which bitwise-identical replicas on CPU need. Lightning's launchers keep an
OMP_NUM_THREADS that is already set.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
