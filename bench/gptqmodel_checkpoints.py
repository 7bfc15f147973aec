"""GPTQ and AWQ folders of a real model written by gptqmodel, for auditing with `--compressed` (NOT a test).

Runs in the throwaway gptqmodel venv of tests/data/packed/PROVENANCE.md (gptqmodel is never a dependency):

    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptq/bin/python bench/gptqmodel_checkpoints.py BASE OUT [--samples 64]

BASE is a transformers folder (e.g. the default model's cache folder, ~/.cache/qdm-engine/SmolLM2-...).
Writes OUT/gptq-w4g128-act (GPTQ 4-bit, group 128, desc_act, sym; SmolLM2's 576 inputs make a last group
of 64) and OUT/awq-w4g64 (AWQ GEMM 4-bit, group 64, zero point: gptqmodel's AWQ needs whole groups), each as gptqmodel's model.save() writes it, and OUT/reference-<name>.safetensors:
gptqmodel's own dequantized weight of every quantized module (float16, (out, in)) from the folder loaded
back on its torch kernels. Calibration: --samples paragraphs of 200+ characters from the END of
wikitext-2 test (the audit reads it from the start).
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "qdm_engine" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--only", choices=["gptq", "awq"])
    a = ap.parse_args()
    base, out = Path(a.base).expanduser().resolve(), Path(a.out).resolve()
    os.chdir(tempfile.mkdtemp(prefix="gptqmodel-"))  # its logs/ go here
    import gptqmodel
    from gptqmodel import BACKEND, AWQConfig, GPTQConfig, GPTQModel
    from transformers import AutoTokenizer

    paras = [p.strip() for p in TEXT.read_text().split("\n") if len(p.strip()) > 200]
    calib = paras[-a.samples:]
    tok = AutoTokenizer.from_pretrained(str(base))
    variants = {"gptq-w4g128-act": GPTQConfig(bits=4, group_size=128, desc_act=True, sym=True),
                "awq-w4g64": AWQConfig(bits=4, group_size=64, sym=False, format="gemm")}
    for name, qcfg in variants.items():
        if a.only and not name.startswith(a.only):
            continue
        model = GPTQModel.load(str(base), qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calib, batch_size=4, tokenizer=tok)
        model.save(str(out / name))
        del model
        tok.save_pretrained(str(out / name))
        q = GPTQModel.load(str(out / name), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
        ref = {}
        for mod_name, mod in q.model.named_modules():
            if not hasattr(mod, "qweight"):
                continue
            if hasattr(mod, "dequantize_weight"):
                w = mod.dequantize_weight()
            else:
                w = mod._dequantize_weight_for_inference(torch.zeros(1, mod.in_features), dtype=torch.float16)
            ref[f"{mod_name}.weight"] = w.T.contiguous()
        save_file(ref, str(out / f"reference-{name}.safetensors"), metadata={"writer": gptqmodel.__version__})
        print(name, len(ref), "modules")


if __name__ == "__main__":
    main()
