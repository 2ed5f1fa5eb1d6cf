"""Token streams for the GPT-2 demo (``examples/train_gpt2.py``), cut into fixed-length training sequences.

Two sources, one DataModule:

- ``dataset=None`` (the default): the Python standard library's own ``.py`` sources,
  present on every Python installation and needing no network. Files are read from
  ``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` excluded) in sorted
  order until ``max_bytes`` bytes; every ``val_every``-th file goes to validation, so
  train and val are disjoint files. Tokens are the raw bytes (vocab 256).
- ``dataset="<name or builder>"``: anything ``datasets.load_dataset`` reads, e.g.
  ``dataset=wikitext, dataset_config=wikitext-2-raw-v1`` (network) or local files with
  ``dataset=text, data_files=[a.txt, b.txt]``. Rows are tokenised with
  ``transformers.AutoTokenizer.from_pretrained(tokenizer)`` (a hub name or a local
  directory) or, with ``tokenizer=None``, at byte level as above. A missing
  ``validation`` split is taken from every ``val_every``-th training row.

Both produce one 1-D token tensor per split; ``TokenBlocks`` serves its consecutive,
non-overlapping windows of ``block_size`` tokens. Lightning's distributed sampler then
gives each rank a different subset of windows. Training batches come from torchdata's
``StatefulDataLoader``, whose position Lightning saves in checkpoints, so a run resumed
mid-epoch continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

__all__ = ["GPT2DataModule", "TokenBlocks", "stdlib_files", "stdlib_corpus", "hf_corpus"]

BYTE_VOCAB_SIZE = 256
_THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}


# -- the embedded default corpus ---------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):  # symlinked folders are not followed
        subfolders[:] = [d for d in subfolders if d not in _THIRD_PARTY_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus(max_bytes: int, val_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 byte tensors from the first ``max_bytes`` bytes of ``stdlib_files()``.

    File i goes to val when ``i % val_every == val_every - 1``; the file that crosses the
    budget is truncated, so exactly ``max_bytes`` bytes are used (if the stdlib has them).
    """
    splits: tuple[list[bytes], list[bytes]] = ([], [])
    remaining = max_bytes
    for i, path in enumerate(stdlib_files()):
        if remaining <= 0:
            break
        text = path.read_bytes()[:remaining]
        splits[i % val_every == val_every - 1].append(text)
        remaining -= len(text)
    train, val = (torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8) for parts in splits)
    return train, val  # (n_train,), (n_val,)


# -- any text dataset through `datasets` -------------------------------------------------
def load_tokenizer(tokenizer: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def _encode_rows(rows: list[str], tokenizer: Any | None) -> np.ndarray:
    """Concatenated token ids of ``rows``, each ending in a newline (the ``text`` builder strips it)."""
    texts = [row if row.endswith("\n") else row + "\n" for row in rows]
    if tokenizer is None:
        return np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(row, dtype=np.int32) for row in ids])


def _split_tokens(split: Any, text_column: str, tokenizer: Any | None) -> torch.Tensor:
    """Tokenise one ``datasets.Dataset`` split into a single 1-D tensor (in row order)."""
    encoded = split.map(lambda batch: {"ids": [_encode_rows(batch[text_column], tokenizer)]},
                        batched=True, batch_size=1000, remove_columns=split.column_names,
                        desc="tokenising")
    dtype = np.uint8 if tokenizer is None else np.int32
    chunks = list(encoded.with_format("numpy")["ids"])  # one array per 1000 rows
    return torch.from_numpy(np.concatenate(chunks).astype(dtype) if chunks else np.empty(0, dtype))


def hf_corpus(dataset: str, dataset_config: str | None, data_files: Any, text_column: str,
              tokenizer: Any | None, val_every: int, cache_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) token tensors from ``datasets.load_dataset(dataset, dataset_config, ...)``."""
    import datasets

    splits = datasets.load_dataset(dataset, dataset_config, data_files=data_files, cache_dir=cache_dir)
    train = splits["train"]
    if "validation" in splits:
        val = splits["validation"]
    else:  # hold out every val_every-th row, deterministically
        rows = np.arange(len(train))
        val = train.select(rows[rows % val_every == val_every - 1])
        train = train.select(rows[rows % val_every != val_every - 1])
    return _split_tokens(train, text_column, tokenizer), _split_tokens(val, text_column, tokenizer)


# -- dataset and DataModule --------------------------------------------------------------
class TokenBlocks(Dataset):
    """Consecutive, non-overlapping windows of ``block_size`` tokens; the tail is dropped."""

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        if len(tokens) < block_size:
            raise ValueError(f"a split of {len(tokens)} tokens is shorter than block_size={block_size}. "
                             "HINT: raise max_bytes / use more text, or lower model.block_size.")
        self.tokens = tokens  # (n,) uint8 or int32
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    @override
    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return self.tokens[start : start + self.block_size].long()  # (T,)


class GPT2DataModule(L.LightningDataModule):
    """Training and validation token windows for ``GPT2Module``.

    Args:
        batch_size: sequences per rank and micro-batch.
        block_size: tokens per sequence (linked from ``model.block_size`` by the CLI).
        max_bytes: byte budget of the stdlib corpus (ignored for ``dataset``).
        val_every: every N-th file (stdlib) or row (``dataset`` without a validation split) is validation.
        dataset, dataset_config, data_files: passed to ``datasets.load_dataset``; None: stdlib corpus.
        text_column: the column holding the text.
        tokenizer: ``AutoTokenizer`` name or directory; None: bytes (vocab 256).
        cache_dir: ``datasets`` cache directory (None: its default).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        batch_size: int = 16,
        block_size: int = 128,
        max_bytes: int = 4_000_000,
        val_every: int = 10,
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        text_column: str = "text",
        tokenizer: str | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if val_every < 2:
            raise ValueError(f"val_every={val_every} must be >= 2. HINT: 10 puts every 10th file/row in validation.")
        if dataset is None and (data_files is not None or tokenizer is not None):
            raise ValueError("data_files/tokenizer need dataset=... HINT: dataset=text for local text files.")
        self.save_hyperparameters()
        self._tokenizer: Any | None = None
        self.train_tokens: torch.Tensor | None = None
        self.val_tokens: torch.Tensor | None = None

    @property
    def tokenizer(self) -> Any | None:
        if self._tokenizer is None and self.hparams.tokenizer is not None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """256 at byte level, else the tokenizer's size (the CLI links it to ``model.vocab_size``)."""
        return BYTE_VOCAB_SIZE if self.tokenizer is None else len(self.tokenizer)

    def load_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        if hp.dataset is None:
            return stdlib_corpus(hp.max_bytes, hp.val_every)
        return hf_corpus(hp.dataset, hp.dataset_config, hp.data_files, hp.text_column, self.tokenizer,
                         hp.val_every, hp.cache_dir)

    @override
    def prepare_data(self) -> None:
        """Rank 0 only: download and tokenise once, so the other ranks hit the ``datasets`` cache."""
        if self.hparams.dataset is not None:
            self.load_tokens()

    @override
    def setup(self, stage: str) -> None:
        if self.train_tokens is None:
            self.train_tokens, self.val_tokens = self.load_tokens()

    @override
    def train_dataloader(self) -> DataLoader:
        assert self.train_tokens is not None
        return self._loader(TokenBlocks(self.train_tokens, self.hparams.block_size), shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        assert self.val_tokens is not None
        return self._loader(TokenBlocks(self.val_tokens, self.hparams.block_size), shuffle=False)

    def _loader(self, dataset: TokenBlocks, shuffle: bool) -> DataLoader:
        """Training (``shuffle``): resumable mid-epoch; validation always starts from the top.

        The training sampler is torch's own ``RandomSampler``, which Lightning replaces by a
        seeded ``DistributedSampler``: a loader built with ``shuffle=True`` would bring
        torchdata's sampler, which Lightning wraps, and whose order would then follow the
        global RNG at resume time instead of the checkpoint."""
        if not shuffle:
            return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
        return StatefulDataLoader(dataset, batch_size=self.hparams.batch_size, sampler=RandomSampler(dataset),
                                  drop_last=True, num_workers=self.hparams.num_workers)
