"""Our SAE encode against SAELens's own `sae.encode`, for every supported architecture."""

import json

import pytest
import torch

SAE = pytest.importorskip("sae_lens", reason="sae_lens is not installed: these tests compare with it").SAE

from qdm_testing import build_sae
from qdm_engine.engine import sae as sae_mod
from qdm_engine.engine.sae import load_sae
from qdm_engine.errors import QdmError

CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "constant_norm_rescale"}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("jumprelu", {}),
    ("topk", {"k": 7}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
]


@pytest.mark.parametrize("arch,extra", CASES, ids=[f"{a}-{'-'.join(e) or 'plain'}" for a, e in CASES])
def test_encode_matches_sae_lens(tmp_path, arch, extra):
    path = build_sae(tmp_path / "sae", arch, d_in=24, d_sae=96, seed=3, **extra)
    ref_sae = SAE.load_from_disk(str(path))
    ours = load_sae(path)
    assert (ours.architecture, ours.d_in, ours.d_sae) == (arch, 24, 96)
    x = torch.randn(50, 24, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    with torch.no_grad():
        expected = ref_sae.encode(x)
    got = ours.encode(x)
    assert (expected > 0).float().mean() > 0.02, "test SAE should fire on some inputs"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_disk_reader_without_sae_lens_matches(tmp_path, monkeypatch):
    path = build_sae(tmp_path / "sae", "jumprelu", d_in=16, d_sae=40, seed=5)
    with_lens = load_sae(path)
    monkeypatch.setattr(sae_mod, "_sae_lens_available", lambda: False)
    without = load_sae(path)
    assert "not installed" in without.identity["loader"]
    for name in ("W_enc", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(without, name), getattr(with_lens, name), rtol=0, atol=0)
    assert without.hook_name == with_lens.hook_name == "blocks.1.hook_resid_post"


def test_bad_sae_inputs(tmp_path):
    with pytest.raises(QdmError, match="does not exist"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QdmError, match="must contain cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path / "empty")
    path = build_sae(tmp_path / "sae", "standard", d_in=8, d_sae=16)
    cfg = json.loads((path / "cfg.json").read_text())
    with pytest.raises(QdmError, match="normalisation 'expected_average_only_in' is not supported"):
        sae_mod.weights_from_state({**cfg, "normalize_activations": "expected_average_only_in"}, {})
    with pytest.raises(QdmError, match="architecture 'gated' is not supported; supported: standard, jumprelu, topk"):
        sae_mod.weights_from_state({**cfg, "architecture": "gated"}, {})
    (path / "cfg.json").write_text("{not json")
    with pytest.raises(QdmError, match="not valid JSON"):
        load_sae(path)


def test_engine_runs_where_sae_lens_is_absent(tiny_sae, tmp_path):
    """The GPU image has no SAELens: the engine, kernels and benchmarks must not import it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sae_lens'] = None\n"  # any 'import sae_lens' now raises ImportError
        "import qdm_engine.audit, qdm_engine.engine.runner, qdm_engine.kernels.encode_moments\n"
        "from qdm_engine.engine import sae\n"
        "sae._sae_lens_available = lambda: False\n"
        f"w = sae.load_sae({str(tiny_sae)!r})\n"
        "print(w.architecture, w.d_in, w.d_sae, 'sae_lens' in sys.modules and sys.modules['sae_lens'] is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["standard", "32", "128", "False"]
