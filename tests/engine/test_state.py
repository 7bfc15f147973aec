"""The run loop's checkpoints (engine.state): what is saved loads with weights_only, when a checkpoint is due,
a stop request, and the whole-sweep ETA on the bar."""

import signal

import pytest
import torch

from qdm_engine.engine.compression import RTN
from qdm_engine.engine.models import load_model
from qdm_engine.engine.runner import run_conditions
from qdm_engine.engine.sae import load_sae
from qdm_engine.engine.state import Interrupted, RunState
from qdm_engine.engine.tokens import make_blocks, read_text


@pytest.fixture(scope="module")
def setup(tiny_llama, tiny_sae, text_file):
    model, tok, _ = load_model(str(tiny_llama), progress=False)
    sae = load_sae(tiny_sae)
    blocks = make_blocks(tok, read_text(text_file), 32, 32 * 12, True)
    return model, [sae], [sae.hook_name], blocks, [RTN(8), RTN(4)], 4  # 3 batches per pass


def test_checkpoints_load_with_weights_only_and_a_resume_in_process_is_bitwise(setup, tmp_path):
    ref = run_conditions(*setup, progress=False)
    stopped = RunState(tmp_path, every=1)
    # stop after int4's first batch, as a SIGINT would
    original = stopped.tick

    def tick(where, b, snapshot):
        if where == "int4" and b == 0:
            stopped.stop_signal = signal.SIGINT
        original(where, b, snapshot)

    stopped.tick = tick
    with pytest.raises(Interrupted):
        run_conditions(*setup, progress=False, state=stopped)
    saved = torch.load(tmp_path / "state-rank0.pt", weights_only=True)
    assert saved["fp"]["finished"] and list(saved["finished"]) == ["int8"] and saved["current"]["done"] == 1
    resumed = run_conditions(*setup, progress=False, state=RunState(tmp_path, every=1))
    for a, b in zip(ref, resumed):
        assert a.nll == b.nll and a.n_targets == b.n_targets
        for ma, mb in zip(a.moments, b.moments):
            assert torch.equal(ma.pack(), mb.pack())
        for ua, ub in zip(a.unit_moments, b.unit_moments):
            assert torch.equal(ua, ub)
    assert ref[0].topk[0].equals(resumed[0].topk[0])
    for a, b in zip(ref[1:], resumed[1:]):
        assert all((x == y).all() for x, y in zip(a.topk, b.topk))


def test_when_a_checkpoint_is_due(tmp_path, monkeypatch):
    s = RunState(tmp_path, every=3)
    assert [b for b in range(9) if s._due(b)] == [2, 5, 8]
    import types

    s = RunState(tmp_path, every="auto")
    clock = iter([1000.0, 1000.0 + 179, 1000.0 + 181] + [2000.0] * 10)
    monkeypatch.setattr("qdm_engine.engine.state.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    s.last_save = 1000.0
    assert not s._due(0) and not s._due(1) and s._due(2)
    s.stop_signal = signal.SIGTERM
    assert s._due(5)  # a stop request checkpoints at the next batch end
    assert not RunState(None).on


def test_bar_shows_the_time_left_for_the_whole_sweep(setup, capsys):
    run_conditions(*setup, progress=True)
    err = capsys.readouterr().err
    assert "sweep left ~" in err and "9/9" in err  # 3 batches x (FP + 2 conditions)
