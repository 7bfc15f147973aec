# TRITON_INTERPRET must be set before anything imports triton (transformers, sae_lens and
# torch._dynamo all do), so that Triton kernels run on CPU through the interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from qdm_testing import build_sae, build_tiny_model, make_text  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (seconds to minutes); still run in CI")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(make_text())
    return p


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_sae(tmp_path_factory) -> Path:
    return build_sae(tmp_path_factory.mktemp("sae") / "sae")
