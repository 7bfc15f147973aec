"""Regenerate the GPTQ / AWQ test checkpoints in this folder with gptqmodel itself (NOT run by the tests).

gptqmodel is not a dependency of qdm-engine (it pins a newer torch and monkeypatches transformers and
safetensors on import), so this runs in a throwaway venv; see PROVENANCE.md for the exact commands:

    GPTQMODEL_CPU_WORKERS=2 /tmp/venv-gptq/bin/python tests/data/packed/make_packed.py

Writes, next to this file:
  base/                   the tiny Llama the checkpoints were quantized from (tests/qdm_testing.py's builder)
  base-mha/               the same with 4 key/value heads (the 3-bit variant's base)
  base-wide/              hidden 64, intermediate 128, 4 key/value heads (the AWQ variant's base)
  <name>/                 each checkpoint folder as gptqmodel's model.save() wrote it (+ the base's tokenizer)
  reference/<name>.safetensors   (kept outside the checkpoint folder, whose weight files qdm-engine hashes)
      '<module>.weight'   gptqmodel's own dequantize_weight() of each quantized module (AWQ: the
                          dequantize_gemm its AwqTorchLinear.forward multiplies by), transposed to
                          (out, in), float16 (the module loaded
                          in float16, as the file stores its scales; its torch kernel needs 16 bits)
      'input_ids', 'logits'  a forward of the checkpoint loaded back with GPTQModel.load (float16, its torch
                          kernel, CPU) on fixed token ids
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for qdm_testing

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from qdm_testing import build_tiny_model, make_text  # noqa: E402

# name -> (config class, kwargs); group 32 fits the tiny model's widths (32 and 64 along the input)
VARIANTS = {
    "gptq-4bit-g32": ("GPTQConfig", dict(bits=4, group_size=32, desc_act=False, sym=True)),
    "gptq-4bit-g32-actorder-asym": ("GPTQConfig", dict(bits=4, group_size=32, desc_act=True, sym=False)),
    "gptq-4bit-g32-lmhead": ("GPTQConfig", dict(bits=4, group_size=32, desc_act=False, sym=True, lm_head=True)),
    # gptqmodel's way to leave modules dense: a '-:' (skip) pattern in `dynamic`
    "gptq-4bit-g32-skip-down": ("GPTQConfig", dict(bits=4, group_size=32, desc_act=False, sym=True,
                                                   dynamic={r"-:.*mlp\.down_proj": {}})),
    "gptq-8bit-g32": ("GPTQConfig", dict(bits=8, group_size=32, desc_act=False, sym=True)),
    # 3-bit qzeros need out_features % 32 == 0: quantized from base-mha (4 key/value heads: k/v_proj 32 wide)
    "gptq-3bit-g32-asym": ("GPTQConfig", dict(bits=3, group_size=32, desc_act=False, sym=False)),
    "gptq_v2-4bit-g32-asym": ("GPTQConfig", dict(bits=4, group_size=32, desc_act=False, sym=False,
                                                 format="gptq_v2")),
    # AWQ's clip search needs out_features % 64 == 0: quantized from base-wide (hidden 64, 4 kv heads)
    "awq-gemm-4bit-g32": ("AWQConfig", dict(bits=4, group_size=32, sym=False, format="gemm")),
}
IDS = [[1, 5, 17, 42, 99, 150, 7, 3, 88, 120, 64, 33]]


def main(names):
    import tempfile

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    os.chdir(tempfile.mkdtemp(prefix="make_packed-"))  # gptqmodel writes its logs/ into the working directory
    from transformers import AutoTokenizer

    if not (HERE / "base").exists():
        build_tiny_model(HERE / "base", "llama", seed=0)
    if not (HERE / "base-mha").exists():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = AutoModelForCausalLM.from_pretrained(str(HERE / "base")).config
        cfg.num_key_value_heads = 4
        AutoModelForCausalLM.from_config(cfg).save_pretrained(str(HERE / "base-mha"))
        AutoTokenizer.from_pretrained(str(HERE / "base")).save_pretrained(str(HERE / "base-mha"))
    if not (HERE / "base-wide").exists():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = AutoModelForCausalLM.from_pretrained(str(HERE / "base")).config
        cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 4, 64, 128, 16
        AutoModelForCausalLM.from_config(cfg).save_pretrained(str(HERE / "base-wide"))
        AutoTokenizer.from_pretrained(str(HERE / "base")).save_pretrained(str(HERE / "base-wide"))
    tok = AutoTokenizer.from_pretrained(str(HERE / "base"))
    calib = [line for line in make_text(n_lines=200, seed=1).splitlines() if len(line) > 40][:64]
    for name in names or VARIANTS:
        cls_name, kw = VARIANTS[name]
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        qcfg = getattr(gptqmodel, cls_name)(**kw)
        base = HERE / ("base-mha" if "3bit" in name else "base-wide" if "awq" in name else "base")
        model = GPTQModel.load(str(base), qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calib, batch_size=4, tokenizer=tok)
        model.save(str(out))
        del model
        tok.save_pretrained(str(out))
        q = GPTQModel.load(str(out), device="cpu", dtype=torch.float16,
                          backend=BACKEND.TORCH)  # torch kernels (AWQ: AWQ_TORCH), no compiled extension
        ref, kernels = {}, set()
        for mod_name, mod in q.model.named_modules():
            if not hasattr(mod, "qweight"):
                continue
            if hasattr(mod, "dequantize_weight"):  # GPTQ modules
                w = mod.dequantize_weight()
            else:  # AwqTorchLinear: the dequantization its forward multiplies by (dequantize_gemm)
                w = mod._dequantize_weight_for_inference(torch.zeros(1, mod.in_features), dtype=torch.float16)
            kernels.add(type(mod).__name__)
            assert tuple(w.shape) == (mod.in_features, mod.out_features), (mod_name, w.shape)
            ref[f"{mod_name}.weight"] = w.T.contiguous()  # (out, in), as nn.Linear holds it
        ids = torch.tensor(IDS)
        with torch.no_grad():
            logits = q.model(input_ids=ids).logits
        ref["input_ids"], ref["logits"] = ids, logits.float().contiguous()
        (HERE / "reference").mkdir(exist_ok=True)
        save_file(ref, str(HERE / "reference" / f"{name}.safetensors"),
                  metadata={"writer": f"gptqmodel {gptqmodel.__version__}", "kernel": ",".join(sorted(kernels))})
        print(name, len(ref) - 2, "modules,", json.loads((out / "config.json").read_text())["quantization_config"])


if __name__ == "__main__":
    main(sys.argv[1:])
