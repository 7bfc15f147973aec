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


@pytest.fixture(scope="session", autouse=True)
def _pinned_autotune_configs():
    """No autotune sweeps inside tests: every autotuned kernel of qdm_engine.kernels keeps one config per
    launch (on a GPU an autotuner benchmarks only when more than one config is left after pruning), so a
    test's result never depends on which config a timing picked. The fused encode keeps one config of
    each GEMM path (its pruning picks the path's one); the others their first config."""
    import importlib
    import pkgutil

    import qdm_engine.kernels as pkg
    from qdm_engine.kernels.backend import HAS_TRITON

    if not HAS_TRITON:
        yield
        return
    from triton.runtime.autotuner import Autotuner

    saved = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for tuner in [v for v in vars(mod).values() if isinstance(v, Autotuner)]:
            saved.append((tuner, tuner.configs))
            if hasattr(mod, "configs_for") and tuner.fn.__name__ == "_encode_moments_kernel":
                key = lambda c: (c.kwargs, c.num_warps, c.num_stages)  # noqa: E731
                split = mod.configs_for(3)
                dot = [c for c in mod.configs_for(0) if key(c) not in [key(s) for s in split]]
                tuner.configs = [split[0], *dot[:1]]
            else:
                tuner.configs = tuner.configs[:1]
    yield
    for tuner, configs in saved:
        tuner.configs = configs
