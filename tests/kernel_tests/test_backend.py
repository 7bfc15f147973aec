"""The one dispatch rule: Triton only for CUDA tensors, never when disabled or interpreting."""

import pytest
import torch

from qdm_engine.kernels import backend


class _FakeCuda:
    is_cuda = True
    device = torch.device("cuda")


def test_use_triton_rule(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(backend.DISABLE_ENV, raising=False)
    cpu = torch.zeros(2)
    assert backend.use_triton(_FakeCuda(), None, _FakeCuda()) is backend.HAS_TRITON
    assert not backend.use_triton(_FakeCuda(), cpu)  # mixed devices: the reference
    assert not backend.use_triton(cpu)
    assert not backend.use_triton(None)
    monkeypatch.setenv(backend.DISABLE_ENV, "1")
    assert not backend.use_triton(_FakeCuda())
    monkeypatch.setenv(backend.DISABLE_ENV, "0")
    assert backend.use_triton(_FakeCuda()) is backend.HAS_TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not backend.use_triton(_FakeCuda())


@pytest.mark.parametrize("value,disabled", [("", False), ("0", False), ("false", False), ("1", True),
                                            ("yes", True), ("TRUE", True)])
def test_disable_env_values(monkeypatch, value, disabled):
    monkeypatch.setenv(backend.DISABLE_ENV, value)
    assert backend.triton_disabled() is disabled


def test_check_launchable_devices(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend.check_launchable("op", torch.zeros(1), None)
    with pytest.raises(ValueError, match="one device"):
        backend.check_launchable("op", torch.zeros(1), torch.zeros(1, device="meta"))
