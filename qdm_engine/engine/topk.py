"""Per-feature top-k FP activations, found during the FP pass, and each condition's activations there.

The FP pass encodes its scored read-outs once more with the plain-torch encoder (`sae_encode_reference`:
one GEMM of tokens x d x features per SAE, against the forward's ~2 x parameters FLOPs per token; the
fused encode + moments kernel never materialises activations, so it cannot hand them over) and keeps, per
feature, the k largest activations and the scored rows where they occur: O(k x features) device memory,
merged chunk by chunk with `torch.topk`. Order: activation descending, ties to the earlier position.
Positions where a feature does not fire (activation <= 0) are never reported, so a feature that fires on
3 positions has 3 entries and one that never fires has none.

After the FP pass the entries go to the host once; from then on each condition computes, per batch, the
compressed activation of each (feature, rank) entry at its row (one dot product per entry for ReLU and
JumpReLU SAEs; indices computed on the host once, copied ahead) into a [k, features] device buffer, read
back when the condition ends. Nothing inside a condition reads a device value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from qdm_engine.kernels.encode_moments import sae_encode_reference

DEFAULT_K = 16
_CHUNK_ELEMENTS = 1 << 24  # rows x features encoded and merged at a time, so the activations stay small
_ROW_MASK = (1 << 32) - 1  # scored rows per shard are numbered below 2**32


def encode(sae, x: torch.Tensor) -> torch.Tensor:
    """Float32 activations [T, F] of read-outs x [T, d] (the SAE's input normalisation applied)."""
    prep = sae.normalise_input if sae.normalize != "none" else (lambda v: v)
    return sae_encode_reference(prep(x), sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold, sae.k)


class TopK:
    """Running top-k of one SAE's FP activations over the scored rows of the FP pass."""

    def __init__(self, n_features: int, k: int, device):
        self.k, self.n_features = int(k), n_features
        self.keys = torch.full((self.k, n_features), -1, dtype=torch.int64, device=device)

    def update(self, acts: torch.Tensor, row0: int) -> None:
        """Merge activations [T, F] of scored rows row0 .. row0 + T - 1.

        Each (activation, row) is one int64 key, the activation's float32 bit pattern (monotonic for
        values >= 0) above the complement of the row, so `torch.topk` on exact integers orders by
        activation and then earlier row, with no ties left for it to break arbitrarily."""
        t = acts.shape[0]
        bits = acts.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)  # relu'd: >= 0 (or -0.0)
        rows = torch.arange(row0, row0 + t, dtype=torch.int64, device=acts.device)
        keys = (bits << 32) + (_ROW_MASK - rows).unsqueeze(1)
        self.keys = torch.topk(torch.cat([self.keys, keys]), self.k, dim=0, sorted=True).values

    def update_from(self, sae, x: torch.Tensor, row0: int) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(1, self.n_features))
        for lo in range(0, x.shape[0], step):
            self.update(encode(sae, x[lo:lo + step]), row0 + lo)

    def entries(self) -> pd.DataFrame:
        """Host table of the kept entries: feature, rank, row (scored row of the shard), fp_act."""
        keys = self.keys.cpu().numpy()
        vals = np.where(keys >= 0, (keys >> 32).astype(np.uint32).view(np.float32), 0.0).astype(np.float32)
        rows = _ROW_MASK - (keys & _ROW_MASK)
        rank, feature = np.nonzero(vals > 0)  # numpy: not a torch op, so never a device read
        order = np.lexsort((rank, feature))
        rank, feature = rank[order], feature[order]
        return pd.DataFrame({"feature": feature.astype(np.int64), "rank": rank.astype(np.int64),
                             "row": rows[rank, feature], "fp_act": vals[rank, feature].astype(np.float32)})


class Gather:
    """Per batch, the compressed activations at the top-k rows of every feature (one SAE).

    Built on the host from the FP entries; for batch b and each of its entries: `row[b]` the batch-local
    scored row, `feat[b]` the feature and `dst[b]` its slot in the flat [k * F] output (rank * F + feature).
    A ReLU or JumpReLU feature's activation is one dot product, (x[row] - b_dec) . W_enc[:, feature] +
    b_enc[feature], so only those are computed (entries x d, not rows x d x features); a TopK SAE needs every
    pre-activation of a row to pick its k, so its distinct rows (`sel[b]`, `src[b]` the entry's flat index
    into their [rows, F] activations) are encoded in full."""

    _ENTRIES = 1 << 14  # entries per dot-product chunk ([chunk, d] gathers of x and W_enc)

    def __init__(self, entries: pd.DataFrame, batch_rows: list[int], sae, k: int, pin: bool):
        self.sae, self.n_features, self.k = sae, sae.d_sae, k
        starts = np.cumsum([0] + list(batch_rows))
        rows = entries["row"].to_numpy()
        feats = entries["feature"].to_numpy()
        slot = entries["rank"].to_numpy() * self.n_features + feats

        def keep(a):
            t = torch.from_numpy(np.ascontiguousarray(a.astype(np.int64)))
            return t.pin_memory() if pin else t

        self.row, self.feat, self.dst, self.sel, self.src = [], [], [], [], []
        for b in range(len(batch_rows)):
            inside = (rows >= starts[b]) & (rows < starts[b + 1])
            local = rows[inside] - starts[b]
            self.row.append(keep(local))
            self.feat.append(keep(feats[inside]))
            self.dst.append(keep(slot[inside]))
            if sae.k is not None:
                uniq, where = np.unique(local, return_inverse=True)
                self.sel.append(keep(uniq))
                self.src.append(keep(where * self.n_features + feats[inside]))

    def start(self, device) -> torch.Tensor:
        return torch.zeros(self.k * self.n_features, dtype=torch.float32, device=device)

    def add(self, out: torch.Tensor, x: torch.Tensor, b: int) -> None:
        """Write the activations of batch b's entries (x: read-outs of the batch's scored rows) into out."""
        if self.dst[b].numel() == 0:
            return
        dev, sae = x.device, self.sae
        dst = self.dst[b].to(dev, non_blocking=True)
        if sae.k is not None:
            acts = encode(sae, x.index_select(0, self.sel[b].to(dev, non_blocking=True)))
            out.index_copy_(0, dst, acts.reshape(-1).index_select(0, self.src[b].to(dev, non_blocking=True)))
            return
        row, feat = self.row[b].to(dev, non_blocking=True), self.feat[b].to(dev, non_blocking=True)
        prep = sae.normalise_input if sae.normalize != "none" else (lambda v: v)
        f32 = torch.float32
        w, b_enc, b_dec = sae.W_enc.to(f32), sae.b_enc.to(f32), sae.b_dec.to(f32)
        for lo in range(0, row.numel(), self._ENTRIES):
            r, f = row[lo:lo + self._ENTRIES], feat[lo:lo + self._ENTRIES]
            xr = prep(x.index_select(0, r)).to(f32) - b_dec
            pre = (xr * w.index_select(1, f).t()).sum(1) + b_enc.index_select(0, f)
            act = pre.relu()
            if sae.threshold is not None:
                act = act * (pre > sae.threshold.to(f32).index_select(0, f))
            out.index_copy_(0, dst[lo:lo + self._ENTRIES], act)


def positions(score_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(block, pos) of every scored row, in the run loop's row order (block by block, BOS at pos 0)."""
    block, pos = np.nonzero(score_mask.cpu().numpy())
    return block.astype(np.int64), pos.astype(np.int64)


def topk_table(runs, tags: list[str]) -> pd.DataFrame:
    """The run folder's topk.parquet: per SAE (column `sae`, its tag) and feature, the top-k FP entries
    (rank 0 = largest), `block` and `pos` indexing the audit blocks as stored (BOS at pos 0 when present),
    `fp_act`, and one column per condition with its activation at the same position."""
    fp, conds = runs[0], runs[1:]
    parts = []
    for i, tag in enumerate(tags):
        if i >= len(fp.topk):
            continue
        e = fp.topk[i].copy()
        e.insert(0, "sae", tag)
        slot_rank, slot_feat = e["rank"].to_numpy(), e["feature"].to_numpy()
        for r in conds:
            e[r.name] = r.topk[i][slot_rank, slot_feat] if r.topk else np.nan
        parts.append(e)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def token_table(blocks, tokenizer) -> pd.DataFrame:
    """The audit blocks as stored, one row per position (block, pos, token id, decoded text), so contexts
    can be shown later without the tokenizer."""
    ids = blocks.ids.cpu().numpy()
    uniq = np.unique(ids)
    text = dict(zip(uniq.tolist(), (tokenizer.decode([int(t)]) for t in uniq)))
    block, pos = np.indices(ids.shape)
    flat = ids.reshape(-1)
    return pd.DataFrame({"block": block.reshape(-1).astype(np.int32), "pos": pos.reshape(-1).astype(np.int32),
                         "token": flat.astype(np.int64), "text": [text[t] for t in flat.tolist()]})
