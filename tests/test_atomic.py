"""Folders and files qdm-engine writes get the modes the user's umask gives (tested under 022 and 077),
also where they are first written under a temporary name and renamed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from qdm_engine.atomic import current_umask, replace_file, temp_dir_beside
from qdm_engine.cli import main


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def assert_tree_follows_umask(root: Path, mask: int) -> int:
    """Every folder under (and including) root is 0777 & ~mask and every file 0666 & ~mask; returns the count."""
    paths = [root, *root.rglob("*")]
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert mode(p) == want, f"{p}: {oct(mode(p))}, want {oct(want)} under umask {oct(mask)}"
    return len(paths)


def test_current_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_temp_folder_and_replaced_file_follow_the_umask(tmp_path, umask):
    tmp = temp_dir_beside(tmp_path / "run")
    assert tmp.parent == tmp_path and tmp.name.startswith(".run.partial-")
    assert mode(tmp) == 0o777 & ~umask
    f = tmp_path / "summary.csv"
    f.write_text("old\n")
    os.chmod(f, 0o600)
    replace_file(f, "new\n")
    assert f.read_text() == "new\n" and mode(f) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "summary.csv"]  # no temp file left


def test_sweep_and_ppl_write_with_the_umask(tiny_llama, tiny_sae, text_file, tmp_path, umask, capsys):
    out = tmp_path / "runs" / "run"
    assert main(["sweep", "--model", str(tiny_llama), "--sae", str(tiny_sae), "--text", str(text_file),
                 "--tokens", "128", "--block-len", "32", "--bits", "4", "--quiet", "--out", str(out)]) == 0
    assert assert_tree_follows_umask(out, umask) >= 6  # the folder, features/, config, 2 summaries, 1 table
    assert main(["ppl", str(out), "--window", "64", "--stride", "32", "--quiet"]) == 0
    assert assert_tree_follows_umask(out, umask) >= 6
    assert main(["report", str(out)]) == 0
    assert_tree_follows_umask(out, umask)
    capsys.readouterr()


def test_default_model_cache_follows_the_umask(monkeypatch, tmp_path, tiny_llama, umask):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qdm_engine.engine import default

    fake = tmp_path / "pkg" / default.GGUF_FILENAME
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(default, "default_gguf_path", lambda: fake)
    monkeypatch.setattr(default, "load_gguf_model", lambda gguf, dtype=torch.float32: (
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)), AutoTokenizer.from_pretrained(str(tiny_llama))))
    default.load_default_model(cache_dir=tmp_path / "cache", progress=False)
    (entry,) = (tmp_path / "cache").iterdir()
    assert assert_tree_follows_umask(entry, umask) >= 4
