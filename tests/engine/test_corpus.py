"""Streamed audit text: a folder of .txt/.jsonl/.parquet files, stdin and a datasets name give the token ids
of the concatenated text file; chunked tokenization; reading stops at the budget."""

import io
import json

import pandas as pd
import pytest
import torch

from qdm_testing import make_text, make_tokenizer
from qdm_engine.engine import corpus
from qdm_engine.engine.tokens import make_blocks, read_text
from qdm_engine.errors import QdmError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(make_text())


def documents(n=12):
    """Documents of several lines, some with blank lines inside (dropped, as read_text drops them)."""
    return [make_text(n_lines=25, seed=s).rstrip("\n") + ("\n\n  \nlast line of doc" if s % 3 == 0 else "")
            for s in range(n)]


@pytest.fixture()
def corpus_folder(tmp_path):
    """The documents spread over .txt, .jsonl (field 'body') and .parquet files in a folder with a subfolder,
    and the concatenated text file they amount to (each document ending in a newline, sorted path order)."""
    docs = documents()
    root = tmp_path / "corpus"
    (root / "b_sub").mkdir(parents=True)
    (root / "a.txt").write_text(docs[0] + "\n" + docs[1] + "\n")
    (root / "b_sub" / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in
                                                    enumerate(docs[2:6])))
    pd.DataFrame({"body": docs[6:10], "n": range(4)}).to_parquet(root / "b_sub" / "d.parquet")
    (root / "e.txt").write_text(docs[10] + "\n" + docs[11])  # no final newline: still a separate document
    (root / "notes.md").write_text("not part of the corpus\n")
    (root / ".hidden.txt").write_text("nor this\n")
    cat = tmp_path / "cat.txt"
    cat.write_text("".join(d + "\n" for d in docs))
    return root, cat


@pytest.mark.parametrize("chunk_chars", [300, corpus.CHUNK_CHARS])
def test_folder_gives_the_concatenated_files_tokens(tok, corpus_folder, chunk_chars):
    root, cat = corpus_folder
    a = corpus.stream_blocks(tok, str(root), 16, None, field="body", chunk_chars=chunk_chars)
    b = corpus.stream_blocks(tok, str(cat), 16, None, chunk_chars=chunk_chars)
    assert torch.equal(a.ids, b.ids) and a.text_tokens == b.text_tokens
    assert read_text(cat) == "\n".join(corpus.lines(str(root), field="body"))


def test_one_chunk_equals_tokenizing_the_whole_text(tok, corpus_folder):
    """Independent reference: the tokenizer run once on read_text's joined text (tokens.make_blocks)."""
    _, cat = corpus_folder
    text = read_text(cat)
    whole = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    b = corpus.stream_blocks(tok, str(cat), 16, 16 * 20, bos=True)
    assert torch.equal(b.ids, make_blocks(tok, text, 16, 16 * 20, True).ids)
    assert b.ids[:, 1:].flatten().tolist() == whole[: 20 * 15].tolist()


def test_chunks_rejoin_to_the_joined_text():
    lines = [f"line {i} " + "x" * (i % 7) for i in range(200)]
    for size in (1, 10, 57, 10**6):
        parts = list(corpus.chunks(iter(lines), size))
        assert "".join(parts) == "\n".join(lines)
        assert all(p.endswith("\n") for p in parts[:-1]) and not parts[-1].endswith("\n")


def test_reading_stops_at_the_budget(tok, tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text(make_text(n_lines=4000))
    read = []
    real = corpus._file_lines

    def counting(*a):
        for line in real(*a):
            read.append(line)
            yield line

    monkeypatch.setattr(corpus, "_file_lines", counting)
    b = corpus.stream_blocks(tok, str(big), 32, 32 * 4, chunk_chars=2000)
    assert b.n_blocks == 4 and len(read) < 200  # of 4000 lines: the budget's chunk and one line more


def test_stdin(tok, corpus_folder):
    _, cat = corpus_folder
    corpus._STDIN_SEEN.clear()
    try:
        stream = io.StringIO(cat.read_text())
        a = corpus.stream_blocks(tok, "-", 16, 16 * 10, stdin=stream)
        held = corpus.stream_blocks(tok, "-", 16, 16 * 5, skip_blocks=10, stdin=stream)  # read on, after the audit's
    finally:
        corpus._STDIN_SEEN.clear()
    b = corpus.stream_blocks(tok, str(cat), 16, 16 * 15)
    assert torch.equal(torch.cat([a.ids, held.ids]), b.ids)


def test_datasets_name_streams_a_local_dataset(tok, corpus_folder, tmp_path):
    pytest.importorskip("datasets")
    root, cat = corpus_folder
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "test.jsonl").write_text((root / "b_sub" / "c.jsonl").read_text())
    want = tmp_path / "want.txt"
    want.write_text("".join(json.loads(r)["body"] + "\n" for r in (root / "b_sub" / "c.jsonl").read_text().splitlines()))
    a = corpus.stream_blocks(tok, f"hf:{ds}", 16, None, field="body")
    assert torch.equal(a.ids, corpus.stream_blocks(tok, str(want), 16, None).ids)


def _write(path, text):
    path.write_text(text)
    return path


def _parquet(path):
    pd.DataFrame({"body": ["a"]}).to_parquet(path)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "nothing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no .txt, .jsonl or .parquet files"),
    (lambda d: _write(d / "x.jsonl", '{"text": "a"}\n{"other": 1}\n'), "line 2 .* has no field 'text'"),
    (lambda d: _write(d / "y.jsonl", '{"text": "a"}\nnot json\n'), "line 2 .* is not a JSON object"),
    (lambda d: _parquet(d / "x.parquet"), "has no column 'text' \\(it has body\\); pass --text-field"),
    (lambda d: _write(d / "blank.txt", "\n \n"), "is empty"),
])
def test_bad_sources(tok, tmp_path, make, message):
    with pytest.raises(QdmError, match=message):
        corpus.stream_blocks(tok, str(make(tmp_path)), 16, 64)
