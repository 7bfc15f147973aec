"""The compile report (bench/aot_report.py): every Triton kernel compiled for Hopper (sm_90a) without a GPU,
and the fused encode held to what the GPU needs: no config spilling more than 1 KB per thread, none
spilling inside its loop over d, every config compiling and fitting in shared memory."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "aot_report.py"
MAX_SPILL = 1024  # bytes of spill stores per thread


def _load_report_module():
    spec = importlib.util.spec_from_file_location("aot_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ptxas_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   STL [R1+0x10], R3 ;
        /*0040*/              @P0 BRA `(.L_x_1) ;
        /*0050*/                   LDL R3, [R1+0x10] ;
        /*0060*/                   STL [R1+0x14], R3 ;
        /*0070*/              @P1 BRA `(.L_x_0) ;
        /*0080*/                   STL [R1+0x18], R3 ;
        /*0090*/                   EXIT ;
"""


def test_loop_spills_counts_only_the_innermost_mma_loop():
    mod = _load_report_module()
    assert mod.loop_spills(SASS) == (1, 1)  # the STL at 0x30; not 0x50/0x60 (outer loop) nor 0x80
    no_mma = SASS.replace("HGMMA.64x64x16.F32.BF16", "FFMA")
    assert mod.loop_spills(no_mma) == (1, 1)  # no MMA loop: the innermost loop counts
    assert mod.loop_spills(SASS.replace("@P0 BRA `(.L_x_1) ;", "NOP ;")) == (3, 1)


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_present(), reason="triton with its bundled ptxas is not installed")
def test_compile_report_sm90a(tmp_path):
    out = tmp_path / "aot.csv"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real: a cached kernel proves nothing
    proc = subprocess.run([sys.executable, str(SCRIPT), "--target", "sm_90a", "--jobs", "2", "--csv", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    assert rows, f"no report rows; stderr:\n{proc.stderr[-3000:]}"
    errors = [r for r in rows if r["error"]]
    assert not errors, "kernels that did not compile or have no case:\n" + "\n".join(
        f"{r['kernel']} [{r['variant']}] {r['config']}: {r['error']}" for r in errors)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kernels = {r["kernel"] for r in rows}
    assert {"_encode_moments_kernel", "_fake_quant_rows_kernel", "_apply_mask_kernel", "_reconstruct_kernel"} <= kernels
    assert not [r for r in rows if "exceeds" in r["warnings"]], "a config needs more shared memory than sm_90a has"

    encode = [r for r in rows if r["kernel"] == "_encode_moments_kernel"]
    variants = {r["variant"] for r in encode}
    assert {"x=bf16,relu,bf16split3", "x=bf16,jumprelu,bf16split3", "x=bf16,topk,bf16split3",
            "x=fp32,relu,tf32x3"} <= variants, variants
    heavy = [r for r in encode if int(r["spill_stores"]) > MAX_SPILL]
    assert not heavy, "encode configs spilling more than 1 KB per thread:\n" + "\n".join(
        f"{r['variant']} {r['config']}: {r['spill_stores']} B" for r in heavy)
    in_loop = [r for r in encode if int(r["loop_spills"]) > 0]
    assert not in_loop, "encode configs spilling inside the loop over d:\n" + "\n".join(
        f"{r['variant']} {r['config']}: {r['loop_spills']} LDL/STL" for r in in_loop)
    for r in encode:  # the GEMMs are on the tensor cores
        assert int(r["mma"]) > 0 and int(r["regs"]) > 0, r

    # the fused encode + decode of the reconstruction metrics: every activation mode, no spills at all
    recon = [r for r in rows if r["kernel"] == "_reconstruct_kernel"]
    assert {"x=bf16,relu,tf32x3", "x=bf16,jumprelu,tf32x3", "x=bf16,topk,tf32x3",
            "x=fp32,relu,tf32x3"} <= {r["variant"] for r in recon}
    assert all(int(r["spill_stores"]) == 0 and int(r["loop_spills"]) == 0 and int(r["mma"]) > 0 for r in recon), \
        [(r["variant"], r["config"], r["spill_stores"]) for r in recon]


@pytest.mark.parametrize("argv,message", [(["--jobs", "0"], "--jobs must be at least 1"),
                                          (["--target", "sm_70"], "invalid choice")])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    mod = _load_report_module()
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
