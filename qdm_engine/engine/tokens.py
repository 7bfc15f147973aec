"""The audit's token tensor: text -> non-empty lines joined -> tokenized once -> fixed-length blocks.

Every condition of a sweep sees this same tensor (docs/METHOD.md section 2). With BOS on (the default, when
the tokenizer has one) every block starts with BOS and BOS positions are left out of the feature
statistics; `bos=False` reproduces the paper's blocks of plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qdm_engine.errors import QdmError


@dataclass
class TokenBlocks:
    ids: torch.Tensor  # [n_blocks, block_len] int64
    score_mask: torch.Tensor  # [n_blocks, block_len] bool: positions whose features are scored
    bos_id: int | None
    text_tokens: int  # tokens the whole text gave

    @property
    def n_blocks(self) -> int:
        return int(self.ids.shape[0])

    @property
    def block_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def scored_positions(self) -> int:
        return int(self.score_mask.sum())

    @property
    def ppl_targets(self) -> int:
        return self.n_blocks * (self.block_len - 1)


def read_text(text: str | Path, flag: str = "--text") -> str:
    """Non-empty lines of a local file, or of a `datasets` name 'path[:config[:split]]', joined by newlines.

    A folder of .txt/.jsonl/.parquet files, a .jsonl/.parquet file or '-' (stdin) is read as engine.corpus
    reads it (field 'text'); the sweep itself streams them (engine.corpus.stream_blocks).

    `flag` is the option the text came from, named in the error messages (--text, --eval-text, ...).
    """
    p = Path(str(text)).expanduser()
    if p.is_dir() or p.suffix in (".jsonl", ".parquet") or str(text) == "-":  # a corpus: engine.corpus streams it
        from qdm_engine.engine.corpus import lines as corpus_lines

        lines = list(corpus_lines(str(text), flag=flag))
    elif p.exists() or str(text).startswith(("/", ".", "~")) or str(text).endswith((".txt", ".raw", ".tokens")):
        if not p.is_file():
            raise QdmError(f"text file '{text}' does not exist; pass {flag} FILE (plain UTF-8 text)")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise QdmError(f"{flag} file '{text}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    else:
        lines = _dataset_lines(str(text), flag)
    joined = "\n".join(line for line in lines if line.strip())
    if not joined:
        raise QdmError(f"text '{text}' is empty (no non-blank lines); pass {flag} a file with text in it")
    return joined


def _dataset_lines(name: str, flag: str = "--text") -> list[str]:
    parts = name.split(":")
    path, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # missing dataset, no network, bad split
        raise QdmError(
            f"could not load {flag} '{name}' as a local file or a datasets name (path[:config[:split]]): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return list(ds[column])


def check_block_args(block_len: int, tokens: int | None) -> None:
    if block_len < 2:
        raise QdmError(f"--block-len must be at least 2, got {block_len}")
    if tokens is not None and tokens < block_len:
        raise QdmError(f"--tokens {tokens} is smaller than one block (--block-len {block_len}); raise --tokens or lower --block-len")


def cut_blocks(ids: torch.Tensor, block_len: int, tokens: int | None, bos_id: int | None, skip_blocks: int,
               n_text: int) -> TokenBlocks:
    """Blocks of `block_len` positions from text token ids: BOS (when `bos_id` is not None) + the next
    block_len - 1 ids each, after `skip_blocks` blocks' worth, at most `tokens` positions in all."""
    body = block_len - (1 if bos_id is not None else 0)
    ids = ids[skip_blocks * body:]
    n_blocks = ids.numel() // body
    if tokens is not None:
        n_blocks = min(n_blocks, tokens // block_len)
    if n_blocks == 0:
        raise QdmError(
            f"the text gives {ids.numel()} tokens{' after the audit blocks' if skip_blocks else ''}, less than one "
            f"block of {block_len}; use a longer text or a smaller --block-len"
        )
    blocks = ids[: n_blocks * body].reshape(n_blocks, body).clone()
    mask = torch.ones(n_blocks, block_len, dtype=torch.bool)
    if bos_id is not None:
        blocks = torch.cat([torch.full((n_blocks, 1), bos_id, dtype=torch.long), blocks], dim=1)
        mask[:, 0] = False
    return TokenBlocks(blocks, mask, bos_id, int(n_text))


def make_blocks(tokenizer, text: str, block_len: int, tokens: int | None, bos: bool = True,
                skip_blocks: int = 0) -> TokenBlocks:
    """Cut the tokenized text into blocks of `block_len` positions, at most `tokens` positions in all.

    With BOS each block is BOS + (block_len - 1) text tokens; the budget counts positions (BOS included).
    `skip_blocks` starts after that many blocks' worth of text: held-out blocks disjoint from an audit's.
    """
    check_block_args(block_len, tokens)
    bos_id = tokenizer.bos_token_id if bos else None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return cut_blocks(ids, block_len, tokens, bos_id, skip_blocks, ids.numel())
