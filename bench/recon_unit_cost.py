"""Per-batch cost of the reconstruction metrics and of --splice on the default model, timed in isolation
(a shared machine's load swamps the difference between whole sweeps):

    python bench/recon_unit_cost.py

One batch of the default sweep (8 blocks of 128 tokens, 1,016 scored positions): the clean forward, the
ReconSums.add of its read-outs (torch reference on the CPU), and the Splicer.add (two more forwards and the
CE / KL sums). A default sweep condition has 8 such batches."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _time(fn, reps=3):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> int:
    import torch

    from qdm_engine.audit import load_lm
    from qdm_engine.engine import default
    from qdm_engine.engine.models import read_out
    from qdm_engine.engine.recon import ReconSums
    from qdm_engine.engine.sae import load_sae
    from qdm_engine.engine.splice import Splicer
    from qdm_engine.engine.tokens import make_blocks, read_text

    sae = load_sae(default.DEFAULT_SAE_DIR)
    lm, tok, _ = load_lm(None, None, torch.float32, "cpu", progress=False)
    blocks = make_blocks(tok, read_text(default.DEFAULT_TEXT), 128, 1024, True)
    ids, mask = blocks.ids, blocks.score_mask
    with torch.inference_mode(), read_out(lm, sae.hook_name) as ro:
        t_fwd = _time(lambda: lm(input_ids=ids, use_cache=False))
        logits = lm(input_ids=ids, use_cache=False).logits
        x = ro.value.reshape(-1, ro.value.shape[-1])[mask.flatten()]
        t_recon = _time(lambda: ReconSums(sae, "cpu").add(x))
        sp = Splicer(lm, [sae], [sae.hook_name])
        t_splice = _time(lambda: sp.add(ids, mask, logits), reps=2)
    print(f"per batch of {ids.shape[0]} x {ids.shape[1]} tokens ({int(mask.sum())} scored), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads:")
    print(f"  clean forward {t_fwd:.2f} s, reconstruction metrics {t_recon:.3f} s "
          f"({100 * t_recon / t_fwd:.1f}% of the forward), --splice {t_splice:.2f} s ({t_splice / t_fwd:.2f} forwards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
