# TRITON_INTERPRET must be set before anything imports triton (transformers, sae_lens and
# torch._dynamo all do), so that Triton kernels run on CPU through the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (seconds to minutes); still run in CI")
