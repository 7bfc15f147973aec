"""Kernel microbenchmarks on pytest-benchmark: each Triton kernel against its torch path at the reference
models' shapes (bench/kernels.py has the same shapes and a hand-made table), with the ceilings measured
in the same run (device copy GB/s, bf16 matmul TFLOP/s). Every row's `extra_info` carries the device,
shape, dtype, its GB/s or TFLOP/s and the ratio to the ceiling, so `--benchmark-json` rows can be compared
across commits (`--benchmark-compare`). Before timing, each kernel's result is checked against its
reference (bits for fake quant and masks; max |r - r_ref| for the encode).
"""

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (requirements.txt lists it)")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qdm_engine.kernels.backend import HAS_TRITON, interpreting  # noqa: E402
from qdm_engine.kernels.encode_moments import (  # noqa: E402
    encode_moments_reference,
    encode_moments_triton,
    resolve_precision,
)
from qdm_engine.kernels.fake_quant import fake_quant_reference, fake_quant_triton  # noqa: E402
from qdm_engine.kernels.prune import apply_mask_reference, apply_mask_triton, magnitude_prune_mask_reference  # noqa: E402

if not HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available() and not interpreting()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# (name, weight [out, in], weight dtype, SAE d, SAE F, JumpReLU, tokens)
MODELS = [("pythia-70m", (2048, 512), torch.float32, 512, 32768, False, 16384),
          ("gemma-2-2b", (9216, 2304), torch.bfloat16, 2304, 16384, True, 16384)]


@pytest.fixture(scope="session")
def small(request) -> bool:
    return request.config.getoption("--small") or not CUDA


def _shapes(small: bool):
    if not small:
        return MODELS
    return [(n + "-small", (max(16, o // 64), max(16, i // 64)), dt, max(16, d // 32), max(64, f // 256), j, 64)
            for n, (o, i), dt, d, f, j, _ in MODELS]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn, small: bool):
    """Time fn with the device synchronised at the end of each call; a few rounds on the interpreter."""
    def call():
        out = fn()
        _sync()
        return out
    if small:
        return benchmark.pedantic(call, rounds=2, iterations=1, warmup_rounds=1)
    return benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=3)


@pytest.fixture(scope="session")
def ceilings(small):
    """Copy GB/s (read + write) and bf16 matmul TFLOP/s on this device, measured once per run."""
    import time

    def best(fn, reps):
        fn()
        _sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            _sync()
            times.append(time.perf_counter() - t)
        return min(times)

    nbytes = (16 << 20) if small else (2 << 30)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy = 2 * nbytes / best(lambda: dst.copy_(src), 3 if small else 20) / 1e9
    n = 256 if small else 8192
    dt = torch.bfloat16 if CUDA else torch.float32  # a CPU's bf16 matmul is its slow path
    a = torch.randn(n, n, device=DEVICE, dtype=dt)
    mm = 2 * n**3 / best(lambda: a @ a, 3 if small else 20) / 1e12
    return {"copy_GBps": copy, "matmul_TFLOPs": mm, "matmul_dtype": SHORT[dt]}


def _info(benchmark, ceilings, shape, dtype, gbytes=None, tflop=None):
    sec = benchmark.stats.stats.median
    info = {"device": torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)", "shape": shape,
            "dtype": dtype, "median_s": sec, **ceilings}
    if gbytes is not None:
        info["GBps"] = gbytes / sec
        info["ratio_to_ceiling"] = info["GBps"] / ceilings["copy_GBps"]
    if tflop is not None:
        info["TFLOPs"] = tflop / sec
        info["ratio_to_ceiling"] = info["TFLOPs"] / ceilings["matmul_TFLOPs"]
    benchmark.extra_info.update(info)


def _weights(shape, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (0.02 * torch.randn(*shape, device=DEVICE, generator=g)).to(dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("model", range(len(MODELS)), ids=[m[0] for m in MODELS])
def test_fake_quant(benchmark, small, ceilings, model, backend):
    name, (o, i), dtype, *_ = _shapes(small)[model]
    w = _weights((o, i), dtype)
    out = torch.empty_like(w)
    fn = (lambda: fake_quant_triton(w, 4, out=out)) if backend == "triton" else (lambda: fake_quant_reference(w, 4))
    res = _run(benchmark, fn, small)
    assert torch.equal(res.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       fake_quant_reference(w, 4).view(torch.int16 if dtype != torch.float32 else torch.int32))
    _info(benchmark, ceilings, f"{name} [{o},{i}] int4 per-row", SHORT[dtype], gbytes=2 * w.numel() * w.element_size() / 1e9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("model", range(len(MODELS)), ids=[m[0] for m in MODELS])
def test_prune_apply(benchmark, small, ceilings, model, backend):
    name, (o, i), dtype, *_ = _shapes(small)[model]
    w = _weights((o, i), dtype, seed=1)
    keep = magnitude_prune_mask_reference(w, 0.5)
    out = torch.empty_like(w)
    fn = (lambda: apply_mask_triton(w, keep, out=out)) if backend == "triton" else (lambda: apply_mask_reference(w, keep))
    res = _run(benchmark, fn, small)
    assert torch.equal(res, apply_mask_reference(w, keep))
    _info(benchmark, ceilings, f"{name} [{o},{i}] s=0.5", SHORT[dtype],
          gbytes=(2 * w.element_size() + 1) * w.numel() / 1e9)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("model", range(len(MODELS)), ids=[m[0] for m in MODELS])
def test_encode_moments(benchmark, small, ceilings, model, backend):
    """The engine's call: read-outs in the model's dtype, float32 SAE, no mask, precision 'auto'."""
    name, _, dtype, d, f, jumprelu, t = _shapes(small)[model]
    g = torch.Generator(device=DEVICE).manual_seed(2)
    W = torch.randn(d, f, device=DEVICE, generator=g) / math.sqrt(d)
    b_enc = -0.5 + 0.1 * torch.randn(f, device=DEVICE, generator=g)
    b_dec = 0.1 * torch.randn(d, device=DEVICE, generator=g)
    thr = 0.2 * torch.rand(f, device=DEVICE, generator=g) if jumprelu else None
    x_fp = torch.randn(t, d, device=DEVICE, generator=g).to(dtype)
    x_c = (x_fp.float() + 0.1 * torch.randn(t, d, device=DEVICE, generator=g)).to(dtype)
    args = (x_fp, x_c, W, b_enc, b_dec, thr)
    kw = {} if CUDA else dict(block_t=32, block_f=32, block_d=16)  # the interpreter: a fixed small tile
    fn = (lambda: encode_moments_triton(*args, **kw)) if backend == "triton" else (lambda: encode_moments_reference(*args))
    res = _run(benchmark, fn, small)
    r, r_ref = res.pearson(), encode_moments_reference(*args).pearson()
    ok = ~torch.isnan(r) & ~torch.isnan(r_ref)
    assert torch.equal(torch.isnan(r), torch.isnan(r_ref)) and float((r - r_ref)[ok].abs().max()) <= 1e-4
    prec = resolve_precision("auto", dtype) if backend == "triton" else "fp32 (torch)"
    _info(benchmark, ceilings, f"{name} T={t} d={d} F={f} {'jumprelu' if jumprelu else 'relu'} {prec}",
          SHORT[dtype], tflop=2 * 2 * t * d * f / 1e12)
