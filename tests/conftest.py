import os
import sys

# One torch thread in every test and in the processes the tests start (set before torch is
# imported, so that workers inherit it): the numbers and the times do not depend on the core
# count, and the suite holds beside other work, where OpenMP threads waiting on each other
# stall on shared cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers.py
