"""pytest-benchmark microbenchmarks of the kernels (bench/test_microbench.py).

    pytest bench/ --benchmark-only --benchmark-json out.json        # GPU: real shapes
    pytest bench/ --benchmark-only --benchmark-compare              # against the last saved run
    TRITON_INTERPRET=1 pytest bench/ --benchmark-only --small       # CPU smoke run (interpreter, tiny shapes)

Without a CUDA device the kernels run through Triton's interpreter (set here, before anything imports
triton) at tiny shapes: that checks the files, not the speed.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")


def pytest_addoption(parser):
    parser.addoption("--small", action="store_true", help="tiny shapes (always so without a GPU)")
