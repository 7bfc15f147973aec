"""Token blocks: text joining, BOS handling and budgets."""

import pytest
import torch

from qdm_testing import make_text, make_tokenizer
from qdm_engine.engine.tokens import make_blocks, read_text
from qdm_engine.errors import QdmError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(make_text())


def test_read_text_drops_blank_lines(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(" \n = Title = \n\n  \nfirst line\nsecond line\n")
    assert read_text(p) == " = Title = \nfirst line\nsecond line"


def test_blocks_with_bos(tok):
    text = make_text(seed=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    b = make_blocks(tok, text, block_len=16, tokens=160, bos=True)
    assert b.ids.shape == (10, 16) and b.bos_id == tok.bos_token_id
    assert torch.all(b.ids[:, 0] == tok.bos_token_id)
    assert b.ids[:, 1:].flatten().tolist() == ids[: 10 * 15]  # consecutive text, 15 per block
    assert b.scored_positions == 150 and not b.score_mask[:, 0].any()
    assert b.ppl_targets == 10 * 15


def test_blocks_without_bos(tok):
    text = make_text(seed=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    b = make_blocks(tok, text, block_len=16, tokens=160, bos=False)
    assert b.ids.flatten().tolist() == ids[:160] and b.scored_positions == 160 and b.bos_id is None


def test_budget_larger_than_text_uses_all_full_blocks(tok):
    text = make_text(n_lines=20, seed=1)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    b = make_blocks(tok, text, block_len=32, tokens=10**9, bos=True)
    assert b.n_blocks == n // 31


@pytest.mark.parametrize("tokens,block_len,msg", [(10, 16, "smaller than one block"), (None, 1, "at least 2")])
def test_bad_budgets(tok, tokens, block_len, msg):
    with pytest.raises(QdmError, match=msg):
        make_blocks(tok, make_text(), block_len=block_len, tokens=tokens)


def test_text_shorter_than_one_block(tok):
    with pytest.raises(QdmError, match="less than one block"):
        make_blocks(tok, "a few words", block_len=512, tokens=None)


def test_missing_and_empty_text(tmp_path):
    with pytest.raises(QdmError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    with pytest.raises(QdmError, match="is empty"):
        read_text(tmp_path / "blank.txt")
