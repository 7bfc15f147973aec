"""The sweep's model loop: one FP pass, then one pass per compression condition.

The FP pass reads the residual stream at every SAE's site and the logits for perplexity from the same
forward, and caches the FP read-outs of the scored positions (BOS dropped), so no condition reruns the
FP model. Each condition then compresses the targeted weights in place, runs the same token batches,
and streams (FP, compressed) read-out pairs through the fused encode + moments op; the FP weights are
restored afterwards. Nothing of size tokens x features is ever held beyond one batch. Several SAEs
(at one or several sites) share the same forward passes. Under torch.distributed each rank runs every
N-th block and the moments are merged across ranks at the end of each condition.

For the feature-level analyses (one process only): the FP pass also keeps each feature's top-k FP
activations and their positions (engine.topk), and each condition its activations at those positions; the
moments of a condition are reduced per bootstrap unit (a run of consecutive blocks inside a batch) into a
[units, 9, features] device buffer and pooled at the end, so analysis.uncertainty can resample units.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from qdm_engine.engine.compression import FP, FPWeights
from qdm_engine.engine.distributed import Shard
from qdm_engine.engine.fpcache import FPCache, choose as choose_cache
from qdm_engine.engine.models import StopForward, read_out, stop_after
from qdm_engine.engine.perplexity import nll_sum_tensor
from qdm_engine.engine.recon import ReconSums
from qdm_engine.engine.sae import SAEWeights
from qdm_engine.engine.state import RunState
from qdm_engine.engine.tokens import TokenBlocks
from qdm_engine.engine.topk import DEFAULT_K, Gather, TopK, positions
from qdm_engine.kernels.backend import use_triton
from qdm_engine.kernels.encode_moments import encode_moments, sae_encode_reference
from qdm_engine.kernels.moments import FeatureMoments


@dataclass
class ConditionRun:
    name: str
    condition: object
    nll: float  # summed over targets; 0 in features-only mode
    n_targets: int
    seconds: float
    moments: list[FeatureMoments] = field(default_factory=list)  # one per SAE; empty for the FP reference
    batch_moments: list[list[FeatureMoments]] = field(default_factory=list)  # per SAE, per batch (keep_batches)
    compress_seconds: float = 0.0  # of `seconds`, the time `apply` took (the method's own quantizer)
    # per SAE: packed moments [U, 9, F] (float64, host) of the bootstrap units (runs of consecutive blocks)
    unit_moments: list[torch.Tensor] = field(default_factory=list)
    # FP run: per SAE, its top-k entries (feature, rank, block, pos, fp_act); a condition: per SAE, its
    # activations [k, F] (float32, host) at those entries' positions (slot [rank, feature])
    topk: list = field(default_factory=list)
    # per SAE: its reconstruction metrics on this model's read-outs (engine.recon; {} for an SAE without a
    # decoder), and with splice its spliced-loss metrics (engine.splice)
    recon: list = field(default_factory=list)
    splice: list = field(default_factory=list)
    fp_cache: str = ""  # FP run: where its read-outs were cached (engine.fpcache: gpu, host or disk)


def auto_batch_size(model: torch.nn.Module, block_len: int, device: str, free_bytes: int | None = None) -> int:
    """Blocks per forward: 8 on CPU; on CUDA as many as a quarter of the free memory holds.

    Per position a forward keeps about the logits (vocab, model dtype, plus a float32 copy per block
    for the loss) and a few dozen hidden-size activations; the OOM fallback covers a wrong guess.
    """
    if not str(device).startswith("cuda") and free_bytes is None:
        return 8
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    emb = model.get_input_embeddings().weight
    vocab, d, item = emb.shape[0], emb.shape[1], emb.element_size()
    per_position = vocab * item + 32 * d * item
    per_block = block_len * per_position + block_len * vocab * 4
    return int(max(1, min(512, (free_bytes // 4) // per_block)))


class _Batch:
    """One batch of blocks: token ids and the flat indices of its scored positions, both computed once on
    the host (in pinned memory on CUDA, so their copies to the GPU are asynchronous): selecting the
    scored rows on the device then never waits for the GPU, as a boolean mask would."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, pin: bool):
        self.ids, self.mask, self.pin = ids, mask, pin
        self.index = self.scored_index()

    def rows(self, lo: int, hi: int) -> "_Batch":
        return _Batch(self.ids[lo:hi], self.mask[lo:hi], self.pin)

    def scored_index(self) -> torch.Tensor:
        index = self.mask.flatten().nonzero().squeeze(1)
        return index.pin_memory() if self.pin else index


def _unit_cuts(score_mask: torch.Tensor, batch_size: int, units: int) -> list[list[tuple[int, int, int]]]:
    """Per batch, the (row_lo, row_hi, unit) of each bootstrap unit: runs of about n_blocks / `units`
    consecutive blocks (never across a batch), as scored-row ranges of the batch's read-outs."""
    per_block = score_mask.cpu().numpy().sum(1)
    n_blocks = len(per_block)
    size = max(1, min(batch_size, -(-n_blocks // units))) if units > 0 else batch_size  # 0: one per batch
    cuts, unit = [], 0
    for lo in range(0, n_blocks, batch_size):
        ends = np.cumsum(per_block[lo:lo + batch_size])
        starts = np.concatenate([[0], ends[:-1]])
        b_cuts = []
        for j in range(0, len(ends), size):
            b_cuts.append((int(starts[j]), int(ends[min(j + size, len(ends)) - 1]), unit))
            unit += 1
        cuts.append(b_cuts)
    return cuts


def reduce_units(fx: torch.Tensor, cx: torch.Tensor, sae: SAEWeights, cuts, packed: torch.Tensor) -> None:
    """Moments of each unit (row_lo, row_hi, slot) of one batch's prepared read-outs into packed[slot].

    The fused kernel runs once per unit; the torch reference encodes the batch once and reduces each unit's
    rows (a GEMM per 127-row unit costs about twice the batch's on a CPU), the same values either way."""
    args = (sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold, sae.k)
    if len(cuts) == 1 or use_triton(fx, cx, sae.W_enc, sae.b_enc, sae.b_dec, sae.threshold):
        for lo, hi, unit in cuts:
            packed[unit].copy_(encode_moments(fx[lo:hi], cx[lo:hi], *args).pack())
        return
    ax, ay = sae_encode_reference(fx, *args), sae_encode_reference(cx, *args)
    rows = cuts[0][1] - cuts[0][0]
    even = [c for c in cuts if c[1] - c[0] == rows and c[0] % rows == 0]
    if len(even) > 1:  # units of one size (the usual case): reduced together, one op per statistic
        lo, hi = even[0][0], even[-1][1]
        slots = torch.tensor([c[2] for c in even], device=packed.device)
        packed.index_copy_(0, slots, _unit_stats(ax[lo:hi].unflatten(0, (-1, rows)),
                                                 ay[lo:hi].unflatten(0, (-1, rows))))
    for lo, hi, unit in (c for c in cuts if len(even) <= 1 or c not in even):
        packed[unit].copy_(FeatureMoments.from_activations(ax[lo:hi], ay[lo:hi]).pack())


def _unit_stats(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Packed moments [U, 9, F] of U equal-sized units x, y [U, R, F] (FeatureMoments.from_activations on
    each unit, computed for all units at once; float64)."""
    u, r, f = x.shape
    out = torch.empty(u, 9, f, dtype=torch.float64, device=x.device)
    out[:, 0] = r
    for lo in range(0, f, chunk):
        xs, ys = x[..., lo:lo + chunk].to(torch.float64), y[..., lo:lo + chunk].to(torch.float64)
        mx, my = xs.mean(1), ys.mean(1)
        dx, dy = xs - mx.unsqueeze(1), ys - my.unsqueeze(1)
        out[:, 1, lo:lo + chunk], out[:, 2, lo:lo + chunk] = mx, my
        out[:, 3, lo:lo + chunk] = (dx * dx).sum(1)
        out[:, 4, lo:lo + chunk] = (dy * dy).sum(1)
        out[:, 5, lo:lo + chunk] = (dx * dy).sum(1)
        out[:, 6, lo:lo + chunk] = (xs > 0).sum(1)
        out[:, 7, lo:lo + chunk] = (ys > 0).sum(1)
        out[:, 8, lo:lo + chunk] = xs.amax(1)
    return out


def _batches(blocks: TokenBlocks, batch_size: int, shard: Shard, pin: bool) -> list[_Batch]:
    ids, mask = blocks.ids[shard.rank::shard.world], blocks.score_mask[shard.rank::shard.world]
    if pin:
        ids = ids.contiguous().pin_memory()
    return [_Batch(ids[lo:lo + batch_size], mask[lo:lo + batch_size], pin) for lo in range(0, ids.shape[0], batch_size)]


class _EncodeStream:
    """Where the encode + moments work of a batch runs.

    On CUDA (with `overlap`) it is a second stream: the read-outs of batch i are encoded there while the
    default stream already runs the forward of batch i + 1, and the copy of batch i's cached FP read-outs
    from pinned host memory rides on it too, overlapping the forward. Ordering: before each batch's
    encode the side stream waits for everything queued so far on the default stream (the read-outs it is
    about to read); tensors made on the default stream and read on the side are marked with
    `record_stream`, so the caching allocator does not hand their memory to the next forward while the
    encode still reads it; at the end of a condition the default stream waits for the side stream.
    Elsewhere (CPU, or overlap off) it is the current stream and every method is a no-op.
    """

    def __init__(self, device: str, overlap: bool):
        self.stream = None
        if overlap and str(device).startswith("cuda"):
            self.main = torch.cuda.current_stream(torch.device(device))
            self.stream = torch.cuda.Stream(device=torch.device(device))

    def enter(self, *made_on_main: torch.Tensor):
        """Context for one batch's encode work; `made_on_main` are the default-stream tensors it reads."""
        if self.stream is None:
            return nullcontext()
        self.stream.wait_stream(self.main)
        for t in made_on_main:
            t.record_stream(self.stream)
        return torch.cuda.stream(self.stream)

    def join(self) -> None:
        if self.stream is not None:
            self.main.wait_stream(self.stream)


def run_conditions(
    model: torch.nn.Module,
    saes: list[SAEWeights],
    hooks: list[str],
    blocks: TokenBlocks,
    conditions: list,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    ppl: bool = True,
    shard: Shard = Shard(),
    keep_batches: bool = False,
    overlap: bool = True,
    topk: int = DEFAULT_K,
    units: int = 64,
    state: RunState | None = None,
    cache: str = "auto",
    cache_dir=None,
    log=None,
    release_base: bool = False,
    recon: bool = True,
    splice: bool = False,
) -> list[ConditionRun]:
    """Run FP then every condition over the same blocks; one ConditionRun per row, FP first.

    `saes[i]` is read at `hooks[i]`. An `FP()` among `conditions` is the FP-vs-FP null: the FP model is
    run again like any condition. With `ppl=False` each forward stops after the deepest read-out layer.
    `keep_batches` also keeps each batch's moments (for token-subset stability; one process only).
    `overlap` (CUDA only) encodes each batch on a second stream while the next forward runs; the
    results are the same either way. Within a condition nothing is read back to the host (NLL sums and
    moments stay on the device until its end), so the host keeps the GPU's queue full.
    The FP pass also keeps each feature's `topk` largest activations (0: off) and every condition its
    activations at those positions; each condition's moments are kept per run of about n_blocks / `units`
    consecutive blocks, for the block bootstrap (analysis.uncertainty). Both only in one process.
    `state` (engine.state) checkpoints the loop and continues from what it loaded: finished passes are
    skipped and a condition in progress restarts after its last checkpointed batch. `cache` (auto, memory,
    disk) and `cache_dir` place the FP read-out cache (engine.fpcache); a memory cache lost with an
    interrupted process is refilled by rerunning the FP forwards only (NLL and top-k come from the state).
    Conditions that replace the weights wholesale (downloaded checkpoints) run after the others; with
    `release_base` the host snapshot of the FP weights is dropped before the first of them (the FP read-outs
    are cached by then), so the base and a checkpoint are never both held, and the model is left holding the
    last checkpoint's weights. The runs come back in the order of `conditions` either way.
    `recon`: every model's read-outs also give each SAE's reconstruction metrics (engine.recon); `splice`
    (needs `ppl`) adds two forwards per SAE and batch for the spliced-loss metrics (engine.splice).
    """
    if splice and not ppl:
        raise ValueError("splice needs the logits: ppl=True")
    state = state if state is not None else RunState()
    if keep_batches and shard.world > 1:
        raise ValueError("keep_batches needs a single process")
    sites = sorted(set(hooks))
    on_cuda = str(device).startswith("cuda")
    batches = _batches(blocks, batch_size, shard, pin=on_cuda)
    mask = blocks.score_mask[shard.rank::shard.world]
    cuts = _unit_cuts(mask, batch_size, units)
    n_units = cuts[-1][-1][2] + 1
    batch_rows = [b_cuts[-1][1] for b_cuts in cuts]
    row0 = np.cumsum([0] + batch_rows).tolist()
    single = shard.world == 1
    trackers = [TopK(s.d_sae, topk, device) for s in saes] if topk and single else []
    fp_saved = state.fp
    fp_done = fp_saved["done"] if fp_saved else 0
    todo = [c for c in conditions if c.name not in state.finished]
    resumed = sum(len(batches) for c in conditions if c.name in state.finished) + sum(
        state.current(c.name)["done"] for c in todo if state.current(c.name))
    bar = tqdm(total=len(batches) * (1 + len(conditions)), initial=fp_done + resumed, unit="batch",
               dynamic_ncols=True, disable=not (progress and shard.is_main))
    eta = _SweepETA(bar)

    split = {"rows": None}  # after an out-of-memory error: the most blocks one forward may take
    no_nll = torch.zeros((), dtype=torch.float64, device=device)
    splicer = None
    if splice:
        from qdm_engine.engine.splice import Splicer

        splicer = Splicer(model, saes, hooks)

    def new_recon() -> list:
        return [ReconSums(s, device) if recon and s.has_decoder else None for s in saes]

    def recon_metrics(accs: list) -> list[dict]:
        for a in accs:
            if a is not None:
                a.merge_ranks(shard)
        return [a.metrics() if a is not None else {} for a in accs]

    def forward_once(batch: _Batch):
        ids = batch.ids.to(device, non_blocking=True)
        keep = batch.index.to(device, non_blocking=True)
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        except StopForward:
            logits = None
        xs = {h: ro[h].value.reshape(-1, ro[h].value.shape[-1]).index_select(0, keep) for h in sites}
        if logits is None:
            return xs, no_nll, 0
        if splicer is not None:
            splicer.add(ids, batch.mask, logits, keep)
        return xs, nll_sum_tensor(logits, ids), ids.shape[0] * (ids.shape[1] - 1)

    def forward(batch: _Batch):
        """Read-outs of the scored positions at each site, and the batch's NLL sum (a device tensor) and
        target count.

        On CUDA out-of-memory the batch is retried in halves (and later batches are split the same way),
        so the results are those of the whole batch.
        """
        n_rows = batch.ids.shape[0]
        while True:
            rows = split["rows"] or n_rows
            failed = False
            if splicer is not None:
                splicer.begin()
            try:
                if rows >= n_rows:
                    parts = [forward_once(batch)]
                else:
                    parts = [forward_once(batch.rows(i, i + rows)) for i in range(0, n_rows, rows)]
            except torch.OutOfMemoryError:
                if rows == 1:
                    raise
                failed = True
            if not failed:
                break
            # Retried outside the except block: a live exception's traceback holds the failed forward's
            # frames, and so its activations, which empty_cache could not then free.
            split["rows"] = (rows + 1) // 2
            if on_cuda:
                torch.cuda.empty_cache()
        if splicer is not None:
            splicer.commit()
        if len(parts) == 1:
            return parts[0]
        xs = {h: torch.cat([p[0][h] for p in parts]) for h in sites}
        return xs, sum(p[1] for p in parts), sum(p[2] for p in parts)

    runs: list[ConditionRun] = []
    emb = model.get_input_embeddings().weight
    width = emb.shape[1]  # every read-out site of a decoder is d_model wide
    need = sum(batch_rows) * width * len(sites) * emb.element_size()
    fp_cache = FPCache(choose_cache(cache, need, device), sites, batch_rows, width, emb.dtype, device,
                       folder=cache_dir, rank=shard.rank, keep=state.on and cache_dir is not None)
    if fp_saved and fp_cache.where == "disk" and fp_cache.keep:
        fp_cache.valid = fp_saved.get("cached", 0)
    if log and todo and (fp_cache.where == "disk" or (on_cuda and fp_cache.where == "host")):
        log(fp_cache.describe())  # only when it left the run device (config.json records it always)
    side = _EncodeStream(device, overlap)
    with torch.inference_mode(), ExitStack() as stack:
        ro = {h: stack.enter_context(read_out(model, h)) for h in sites}
        if not ppl:
            stack.enter_context(stop_after(model, sites))
        bar.set_description("fp")
        t0, nll, n, fp_seconds = time.perf_counter(), no_nll.clone(), 0, 0.0
        fp_recon = new_recon()
        if fp_saved:  # continue from the checkpoint: its sums and top-k keys
            nll, n, fp_seconds = fp_saved["nll"].to(device), int(fp_saved["n"]), float(fp_saved["seconds"])
            for tracker, keys in zip(trackers, fp_saved["keys"]):
                tracker.keys = keys.to(device)
            _load_sums(fp_saved, fp_recon, splicer, device)
        fp_finished = bool(fp_saved and fp_saved["finished"])

        def fp_snapshot(done: int, finished: bool = False) -> dict:
            return {"done": done, "finished": finished, "nll": nll, "n": n,
                    "seconds": fp_seconds + time.perf_counter() - t0, "keys": [t.keys for t in trackers],
                    "cached": done if fp_cache.sync() else 0} | _sums_state(fp_recon, splicer)

        for b, batch in enumerate(batches):
            if b < fp_done or fp_finished:  # counted before: only the cache may need these read-outs again
                if todo and not fp_cache.has(b):
                    bar.set_description("fp (refill cache)")
                    counted = splicer.sums.clone() if splicer is not None else None
                    fp_cache.put(b, forward(batch)[0])
                    if splicer is not None:  # this batch's spliced losses are in the checkpoint's sums already
                        splicer.sums = counted
                continue
            xs, b_nll, b_n = forward(batch)
            fp_cache.put(b, xs)
            for acc, hook in zip(fp_recon, hooks):
                if acc is not None:
                    acc.add(xs[hook])
            for tracker, sae, hook in zip(trackers, saes, hooks):
                tracker.update_from(sae, xs[hook], row0[b])
            nll, n = nll + b_nll, n + b_n
            bar.update()
            eta.update()
            state.tick("fp", b, lambda: fp_snapshot(b + 1))
        if not fp_finished:
            nll, n = shard.sum(float(nll), n)
            state.pass_done("fp", fp_snapshot(len(batches), True) | {"nll": torch.tensor(nll, dtype=torch.float64)})
        else:
            nll = float(nll)
        fp_seconds = fp_seconds + (0.0 if fp_finished else time.perf_counter() - t0)
        if shard.world > 1 and state.on:
            state.sync_every, state.min_batches = _agreed_interval(state.every, fp_seconds, len(batches), shard,
                                                                     blocks.n_blocks, batch_size)
        entries, gathers = [], []
        if trackers:
            block_of, pos_of = positions(mask)
            for tracker, sae in zip(trackers, saes):
                e = tracker.entries()
                gathers.append(Gather(e, batch_rows, sae, topk, pin=on_cuda))
                e.insert(2, "block", block_of[e["row"].to_numpy()])
                e.insert(3, "pos", pos_of[e["row"].to_numpy()])
                entries.append(e.drop(columns="row"))
        runs.append(ConditionRun("fp", FP(), nll, int(n), fp_seconds, topk=entries, fp_cache=fp_cache.where,
                                 recon=recon_metrics(fp_recon), splice=splicer.metrics(shard) if splicer else []))

        replaces = [bool(getattr(c, "replaces_weights", False)) for c in conditions]
        order = [i for i, r in enumerate(replaces) if not r] + [i for i, r in enumerate(replaces) if r]
        in_process = any(not isinstance(c, FP) and not r for c, r in zip(conditions, replaces))
        saved = FPWeights(model) if in_process or (any(replaces) and not release_base) else None
        done: dict[int, ConditionRun] = {}
        for at in order:
            cond = conditions[at]
            earlier = state.finished.get(cond.name)
            if earlier is not None:  # finished before an interruption: as it was saved
                done[at] = _restored_run(cond, earlier, topk)
                continue
            if replaces[at] and release_base and saved is not None:
                saved = None  # only checkpoints from here on: the FP weights are not needed again
                gc.collect()
            bar.set_description(cond.name)
            t0, nll, n, spent = time.perf_counter(), no_nll.clone(), 0, 0.0
            with side.enter():
                packed = [torch.zeros(n_units, 9, s.d_sae, dtype=torch.float64, device=device) for s in saes]
                at_topk = [g.start(device) for g in gathers]
            cur, start = state.current(cond.name), 0
            if cur is not None:  # a checkpoint inside this condition: continue after its last batch
                packed = [p.to(device) for p in cur["packed"]]
                at_topk = [a.to(device) for a in cur["at_topk"]]
                nll, n, start, spent = cur["nll"].to(device), int(cur["n"]), int(cur["done"]), float(cur["seconds"])

            def cond_snapshot(done: int) -> dict:
                side.join()  # a checkpoint reads the moments the side stream is writing
                return {"name": cond.name, "done": done, "nll": nll, "n": n, "packed": packed, "at_topk": at_topk,
                        "seconds": spent + time.perf_counter() - t0} | _sums_state(c_recon, splicer)
            kept: list[list[FeatureMoments]] = [[] for _ in saes]
            c_recon = new_recon()
            if splicer is not None:
                splicer.start()
            if cur is not None:
                _load_sums(cur, c_recon, splicer, device)
            t_apply = time.perf_counter()
            cond.apply(model)
            if on_cuda:
                torch.cuda.synchronize(device)
            t_apply = time.perf_counter() - t_apply
            try:
                for b, batch in enumerate(batches):
                    if b < start:
                        continue
                    xs, b_nll, b_n = forward(batch)
                    with side.enter(*xs.values()):
                        fp_xs = fp_cache.get(b)
                        for i, (sae, hook) in enumerate(zip(saes, hooks)):
                            prep = sae.normalise_input if sae.normalize != "none" else (lambda x: x)
                            fx, cx = prep(fp_xs[hook]), prep(xs[hook])
                            reduce_units(fx, cx, sae, cuts[b], packed[i])
                            if c_recon[i] is not None:
                                c_recon[i].add(xs[hook])
                            if keep_batches:
                                first, last = cuts[b][0][2], cuts[b][-1][2]
                                kept[i].append(FeatureMoments.combine(packed[i][first:last + 1]).to("cpu"))
                            if gathers:
                                gathers[i].add(at_topk[i], xs[hook], b)
                    nll, n = nll + b_nll, n + b_n
                    bar.update()
                    eta.update()
                    state.tick(cond.name, b, lambda: cond_snapshot(b + 1))
            finally:
                side.join()  # also on an error: nothing the side stream reads may be freed under it
                if saved is not None:  # queued on the default stream after this condition's forwards
                    saved.restore()
            nll, n = shard.sum(float(nll), n)
            accs = [shard.merge(FeatureMoments.combine(p)) for p in packed]
            done[at] = r = ConditionRun(cond.name, cond, nll, int(n), spent + time.perf_counter() - t0, accs,
                                        kept if keep_batches else [], t_apply,
                                        unit_moments=[p.cpu() for p in packed] if single else [],
                                        topk=[a.cpu().numpy().reshape(topk, -1) for a in at_topk],
                                        recon=recon_metrics(c_recon), splice=splicer.metrics(shard) if splicer else [])
            state.pass_done(cond.name, {"nll": torch.tensor(r.nll, dtype=torch.float64), "n": r.n_targets,
                                        "seconds": r.seconds, "compress_seconds": r.compress_seconds,
                                        "moments": [m.pack() for m in accs], "unit_moments": r.unit_moments,
                                        "topk": at_topk, "recon": r.recon, "splice": r.splice})
        runs += [done[at] for at in range(len(conditions))]
    bar.close()
    fp_cache.close(remove=not state.on)
    return runs


def _sums_state(accs: list, splicer) -> dict:
    """The reconstruction and spliced-loss sums of a pass so far, for a checkpoint."""
    return {"recon": [None if a is None else [a.sums, a.sum_x, a.fired] for a in accs],
            "splice": None if splicer is None else splicer.sums}


def _load_sums(saved: dict, accs: list, splicer, device) -> None:
    """Continue a pass's reconstruction and spliced-loss sums from its checkpoint."""
    for a, sums in zip(accs, saved.get("recon") or []):
        if a is not None and sums is not None:
            a.sums, a.sum_x, a.fired = (t.to(device) for t in sums)
    if splicer is not None and saved.get("splice") is not None:
        splicer.sums = saved["splice"].clone()


def _restored_run(cond, saved: dict, topk: int) -> ConditionRun:
    """A condition finished before an interruption, from its checkpoint (the values it had, bit for bit)."""
    return ConditionRun(cond.name, cond, float(saved["nll"]), int(saved["n"]), float(saved["seconds"]),
                        [FeatureMoments.unpack(p) for p in saved["moments"]], [], float(saved["compress_seconds"]),
                        unit_moments=list(saved["unit_moments"]),
                        topk=[a.numpy().reshape(topk, -1) for a in saved["topk"]],
                        recon=list(saved.get("recon") or []), splice=list(saved.get("splice") or []))


def _agreed_interval(every, fp_seconds: float, n_batches: int, shard: Shard, n_blocks: int,
                     batch_size: int) -> tuple[int, int]:
    """Under several processes: one checkpoint interval for all ranks (auto: about AUTO_SECONDS of FP
    batches, the smallest over ranks) and the fewest batches any rank runs (checkpoints stop before it)."""
    from qdm_engine.engine.state import AUTO_SECONDS

    if every == "auto":
        per_batch = fp_seconds / max(1, n_batches)
        every = max(1, int(AUTO_SECONDS / max(per_batch, 1e-6)))
    fewest = min(-(-len(range(r, n_blocks, shard.world)) // batch_size) for r in range(shard.world))
    import torch.distributed as dist

    t = torch.tensor([int(every)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t), fewest


class _SweepETA:
    """The time left for the whole sweep (every pass), on the bar's postfix, from this session's rate."""

    def __init__(self, bar):
        self.bar, self.t0, self.n0 = bar, time.perf_counter(), bar.n

    def update(self) -> None:
        if self.bar.disable:
            return
        done = self.bar.n - self.n0
        left = (self.bar.total - self.bar.n) * (time.perf_counter() - self.t0) / max(done, 1)
        self.bar.set_postfix_str(f"sweep left ~{tqdm.format_interval(left)}", refresh=False)
