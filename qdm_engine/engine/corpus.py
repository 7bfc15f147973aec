"""Audit text that streams: a file, a folder of .txt/.jsonl/.parquet files, stdin, or a `datasets` name.

Every source is read as one stream of non-blank lines (documents one after another, in sorted file order for
a folder; a .jsonl/.parquet record's `--text-field` is split into its lines), so the separator between
documents is a newline, exactly as in the text file `cat`-ing the documents (each ending in a newline)
would give. The stream is tokenized in chunks of about `CHUNK_CHARS` characters, cut at line boundaries,
each chunk but the last carrying the newline that joins it to the next: the token ids are a function of
the line stream alone (never of the budget, of file boundaries or of how lines arrived), so a folder gives
the same ids as its concatenated file, and a text of one chunk the same ids as tokenizing it whole.
Reading stops as soon as the budget's blocks are filled: memory is bounded by the budget and one chunk,
not by the size of the corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from qdm_engine.engine.tokens import TokenBlocks, check_block_args, cut_blocks
from qdm_engine.errors import QdmError

CHUNK_CHARS = 1 << 20  # characters tokenized at a time (about a second of a fast tokenizer)
SUFFIXES = (".txt", ".jsonl", ".parquet")
STDIN = "-"


def _file_lines(p: Path, field: str, flag: str) -> Iterator[str]:
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as fh:
            for n, row in enumerate(fh, 1):
                if not row.strip():
                    continue
                try:
                    value = json.loads(row)[field]
                except (json.JSONDecodeError, TypeError) as exc:
                    raise QdmError(f"{flag}: line {n} of '{p}' is not a JSON object ({exc})") from None
                except KeyError:
                    raise QdmError(f"{flag}: line {n} of '{p}' has no field '{field}'; pass --text-field NAME") from None
                yield from str(value or "").splitlines()
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(p)
        if field not in f.schema_arrow.names:
            raise QdmError(f"{flag}: '{p}' has no column '{field}' (it has {', '.join(f.schema_arrow.names)}); "
                           "pass --text-field NAME")
        for batch in f.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield from str(value or "").splitlines()
    else:
        try:
            with p.open(encoding="utf-8") as fh:
                for line in fh:  # str.splitlines's line breaks, as tokens.read_text splits a file
                    yield from line.splitlines()
        except UnicodeDecodeError as exc:
            raise QdmError(f"{flag} file '{p}' is not UTF-8 text ({exc.reason})") from None


def folder_files(folder: Path, flag: str = "--text") -> list[Path]:
    """The corpus files of a folder (and its subfolders), in sorted path order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise QdmError(f"{flag} folder '{folder}' holds no .txt, .jsonl or .parquet files")
    return files


def kind(source: str) -> str:
    """'stdin', 'folder', 'file' or 'datasets' (a name for datasets.load_dataset; 'hf:' forces it)."""
    if source == STDIN:
        return "stdin"
    if source.startswith("hf:"):
        return "datasets"
    p = Path(source).expanduser()
    if p.is_dir():
        return "folder"
    if p.exists() or source.startswith(("/", ".", "~")) or p.suffix in (".txt", ".raw", ".tokens", ".jsonl", ".parquet"):
        return "file"
    return "datasets"


def raw_lines(source: str, field: str = "text", flag: str = "--text", stdin=None) -> Iterator[str]:
    """Every line of a source, blank ones included (see `lines`)."""
    k = kind(source)
    if k == "stdin":
        yield from _stdin_lines(stdin, flag)
    elif k == "folder":
        for p in folder_files(Path(source).expanduser(), flag):
            yield from _file_lines(p, field, flag)
    elif k == "file":
        p = Path(source).expanduser()
        if not p.is_file():
            raise QdmError(f"text file '{source}' does not exist; pass {flag} FILE, a folder of .txt/.jsonl/.parquet "
                           "files, or - for standard input")
        yield from _file_lines(p, field, flag)
    else:
        yield from _dataset_lines(source.removeprefix("hf:"), field, flag)


_STDIN = None
_STDIN_SEEN: list[str] = []  # standard input can be read once: the lines read so far, for a second pass


def _stdin_lines(stdin, flag: str) -> Iterator[str]:
    """Lines of standard input; a second reader (the held-out blocks after the audit's, say) gets the lines
    already read again before reading on. Only the lines up to the budget are ever read, and kept."""
    global _STDIN
    yield from list(_STDIN_SEEN)
    if stdin is None and _STDIN is None:  # one reader for the process: a wrapper reads ahead of what it yields
        _STDIN = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
    stream = stdin or _STDIN
    try:
        for line in stream:
            parts = line.splitlines()
            _STDIN_SEEN.extend(parts)
            yield from parts
    except UnicodeDecodeError as exc:
        raise QdmError(f"{flag} -: standard input is not UTF-8 text ({exc.reason})") from None


def _dataset_lines(name: str, field: str, flag: str) -> Iterator[str]:
    """A `datasets` name path[:config[:split]] (split default test), streamed: never downloaded whole."""
    parts = name.split(":")
    path, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = (parts[2] if len(parts) > 2 else "") or "test"
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split, streaming=True)
        first = next(iter(ds), None)
    except Exception as exc:  # missing dataset, no network, bad split
        raise QdmError(
            f"could not load {flag} '{name}' as a local file, folder or a datasets name (path[:config[:split]]): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if first is None:
        return
    column = field if field in first else ("text" if "text" in first else next(iter(first)))
    for row in ds:
        yield from str(row[column] or "").splitlines()


def lines(source: str, field: str = "text", flag: str = "--text", stdin=None) -> Iterator[str]:
    """The non-blank lines of a source, in order (the audit text's documents, newline-separated)."""
    return (line for line in raw_lines(source, field, flag, stdin) if line.strip())


def chunks(line_iter: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Join lines with newlines into pieces of about `chunk_chars`, cut at line boundaries; every piece but
    the last ends with the newline that joins it to the next, so their concatenation is the joined text."""
    buf, size, pending = [], 0, None
    for line in line_iter:
        if pending is not None:
            yield pending + "\n"
            pending = None
        buf.append(line)
        size += len(line) + 1
        if size >= chunk_chars:
            pending, buf, size = "\n".join(buf), [], 0
    if pending is not None:  # the stream ended right after a full piece
        yield pending
    if buf:
        yield "\n".join(buf)


def head(source: str, n_chars: int, field: str = "text", flag: str = "--text") -> str:
    """About the first `n_chars` characters of the joined text (for checks that need a sample)."""
    out, size = [], 0
    for line in lines(source, field, flag):
        out.append(line)
        size += len(line) + 1
        if size >= n_chars:
            break
    return "\n".join(out)[:n_chars]


def token_stream(tokenizer, source: str, field: str = "text", flag: str = "--text", chunk_chars: int = CHUNK_CHARS,
                 stdin=None) -> Iterator[np.ndarray]:
    """Token ids of the source, chunk by chunk (int64 arrays)."""
    for piece in chunks(lines(source, field, flag, stdin), chunk_chars):
        yield np.asarray(tokenizer(piece, add_special_tokens=False)["input_ids"], dtype=np.int64)


def ids_sha256(ids: torch.Tensor) -> str:
    """Fingerprint of token ids (as little-endian int64), e.g. of the audit blocks."""
    return hashlib.sha256(np.ascontiguousarray(ids.cpu().numpy().astype("<i8")).tobytes()).hexdigest()


def stream_blocks(tokenizer, source: str, block_len: int, tokens: int | None, bos: bool = True,
                  skip_blocks: int = 0, field: str = "text", flag: str = "--text", chunk_chars: int = CHUNK_CHARS,
                  stdin=None) -> TokenBlocks:
    """As tokens.make_blocks, from a streamed source: reading stops once the budget's blocks are filled.

    `text_tokens` is the number of tokens read (all of the text's only when the text ran out first)."""
    check_block_args(block_len, tokens)
    bos_id = tokenizer.bos_token_id if bos else None
    body = block_len - (1 if bos_id is not None else 0)
    want = None if tokens is None else (skip_blocks + tokens // block_len) * body
    parts, have, any_text = [], 0, False
    for ids in token_stream(tokenizer, source, field, flag, chunk_chars, stdin):
        any_text = True
        parts.append(ids)
        have += ids.size
        if want is not None and have >= want:
            break
    if not any_text:
        raise QdmError(f"text '{source}' is empty (no non-blank lines); pass {flag} a file with text in it")
    ids = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)
    return cut_blocks(ids, block_len, tokens, bos_id, skip_blocks, ids.numel())


def describe(source: str) -> str:
    """How a source is recorded in config.json: a path made absolute, '-' or the datasets name."""
    k = kind(source)
    return str(Path(source).expanduser().resolve()) if k in ("file", "folder") else source
