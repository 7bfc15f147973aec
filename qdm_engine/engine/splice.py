"""Spliced-loss metrics (`sweep --splice`): the SAE's reconstruction put in place of the read-out at its
site, and the site zero-ablated, as SAELens's `get_recons_loss` does (sae_lens/evals.py, METHOD.md 4b).

For every batch of a condition (and of the FP pass) the clean forward is the one the sweep already runs;
`--splice` adds two forwards per SAE: one with the site's value replaced by decode(encode(value)) at the
scored positions (BOS positions keep their own value, as SAELens's mask keeps the special tokens'), one
with the site's value zeroed at every position (SAELens's zero ablation). Over the scored positions:

    ce_loss_with_sae / _without_sae / _with_ablation   mean next-token cross-entropy at the targets whose
                                                       input position is scored (the last position has none)
    kl_div_with_sae / _with_ablation                   mean KL(clean || spliced) over the scored positions
    ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)
    kl_div_score  = (KL_ablation - KL_sae) / KL_ablation

Sums are float64 and pooled over all batches (SAELens concatenates the per-token values and takes one
mean: the same numbers). The reconstruction is computed in token chunks (SAEWeights.reconstruct), so at
most one chunk x d_sae activations exist at once.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from qdm_engine.engine.models import decoder_layers, parse_hook
from qdm_engine.engine.sae import SAEWeights

SPLICE_METRICS = ("ce_loss_score", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae",
                  "ce_loss_with_ablation", "kl_div_with_sae", "kl_div_with_ablation")


@contextmanager
def replace_site(model: torch.nn.Module, hook: str, fn):
    """Context manager: every forward inside it replaces the value at `hook` ([B, S, d]) by fn(value).
    The same module and side as `read_out` reads (engine/models.py, engine/sites.py)."""
    layers = decoder_layers(model)
    layer, side = parse_hook(hook, len(layers))
    if side in ("post", "pre"):
        mod, where = layers[layer], ("out" if side == "post" else "in")
    else:
        from qdm_engine.engine.sites import site_module

        mod, where = site_module(layers[layer], side, hook)
    if where == "out":
        def swap(_mod, _args, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        handle = mod.register_forward_hook(swap)
    else:
        def swap(_mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: fn(kwargs[key])}

        handle = mod.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def token_ce_kl(clean: torch.Tensor, new: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor):
    """(CE sum of `new` (of `clean` when new is None) over the targets whose input position is in `mask`,
    KL(clean || new) sum over the positions in `mask`), float64 0-d tensors; one block at a time in float32."""
    ce = torch.zeros((), dtype=torch.float64, device=clean.device)
    kl = torch.zeros((), dtype=torch.float64, device=clean.device)
    weights = mask.to(clean.device, torch.float64)  # a product, not a boolean index: nothing read back
    for b in range(clean.shape[0]):
        lc = F.log_softmax(clean[b].to(torch.float32), dim=-1)
        ln = lc if new is None else F.log_softmax(new[b].to(torch.float32), dim=-1)
        nll = -ln[:-1].gather(1, ids[b, 1:].to(clean.device)[:, None]).squeeze(1)
        ce += (nll.to(torch.float64) * weights[b, :-1]).sum()
        if new is not None:
            kl += ((lc.exp() * (lc - ln)).sum(-1).to(torch.float64) * weights[b]).sum()
    return ce, kl


class Splicer:
    """The spliced and ablated forwards of each SAE for every batch, with their float64 sums.

    Per batch: `begin()`, then `add(...)` once per (sub-)batch the clean forward ran, then `commit()` (a
    batch retried after running out of memory starts again from `begin()`, so nothing is counted twice).
    `start()` clears the sums for the next model (FP or a condition)."""

    def __init__(self, model: torch.nn.Module, saes: list[SAEWeights], hooks: list[str]):
        self.model, self.saes, self.hooks = model, saes, hooks
        self.start()

    def start(self) -> None:
        # per SAE: CE sum spliced, CE sum ablated, KL sum spliced, KL sum ablated; then CE clean, n_ce, n_kl
        # (on the logits' device from the first batch on: nothing is read back before metrics())
        self.sums = torch.zeros(4 * len(self.saes) + 3, dtype=torch.float64)
        self.begin()

    def begin(self) -> None:
        self.pending = torch.zeros_like(self.sums)

    def commit(self) -> None:
        self.sums = self.sums.to(self.pending.device) + self.pending
        self.begin()

    def _forward(self, ids: torch.Tensor, hook: str, fn) -> torch.Tensor:
        with replace_site(self.model, hook, fn):
            return self.model(input_ids=ids, use_cache=False).logits

    def add(self, ids: torch.Tensor, mask: torch.Tensor, clean: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The two extra forwards per SAE for one batch: ids [B, S], mask [B, S] (scored positions, on the
        host), clean logits [B, S, V] of the model as it is now; `rows`: the flat indices of the scored
        positions on ids' device, when the caller has them already."""
        if rows is None:
            rows = mask.flatten().nonzero().squeeze(1).to(ids.device)
        parts = []
        ablated: dict[str, torch.Tensor] = {}
        for sae, hook in zip(self.saes, self.hooks):
            def spliced(v, sae=sae):
                flat = v.reshape(-1, v.shape[-1])
                x_hat = sae.reconstruct(flat.index_select(0, rows)).to(v.dtype)
                return flat.index_copy(0, rows, x_hat).view(v.shape)

            ce_s, kl_s = token_ce_kl(clean, self._forward(ids, hook, spliced), ids, mask)
            if hook not in ablated:  # one zero-ablated forward per site, shared by its SAEs
                ablated[hook] = torch.stack(token_ce_kl(clean, self._forward(ids, hook, torch.zeros_like), ids, mask))
            parts += [ce_s, ablated[hook][0], kl_s, ablated[hook][1]]
        ce_clean, _ = token_ce_kl(clean, None, ids, mask)
        counts = torch.tensor([mask[:, :-1].sum(), mask.sum()], dtype=torch.float64)  # host mask: no device read
        parts += [ce_clean, *counts.to(ce_clean.device).unbind()]
        self.pending = self.pending.to(ce_clean.device) + torch.stack(parts)

    def metrics(self, shard=None) -> list[dict[str, float]]:
        """Per SAE the SPLICE_METRICS (summed over ranks under torch.distributed)."""
        sums = self.sums.cpu().numpy().tolist()
        if shard is not None and shard.world > 1:
            sums = list(shard.sum(*sums))
        ce_clean, n_ce, n_kl = sums[-3:]
        out = []
        for i in range(len(self.saes)):
            ce_s, ce_a, kl_s, kl_a = sums[4 * i:4 * i + 4]
            m = {"ce_loss_with_sae": ce_s / n_ce, "ce_loss_without_sae": ce_clean / n_ce,
                 "ce_loss_with_ablation": ce_a / n_ce, "kl_div_with_sae": kl_s / n_kl,
                 "kl_div_with_ablation": kl_a / n_kl}
            den = m["ce_loss_with_ablation"] - m["ce_loss_without_sae"]
            m["ce_loss_score"] = (m["ce_loss_with_ablation"] - m["ce_loss_with_sae"]) / den if den else float("nan")
            m["kl_div_score"] = ((m["kl_div_with_ablation"] - m["kl_div_with_sae"]) / m["kl_div_with_ablation"]
                                 if m["kl_div_with_ablation"] else float("nan"))
            out.append({k: m[k] for k in SPLICE_METRICS})
        return out
