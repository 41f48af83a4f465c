"""A tiny in-memory token dataset for Trainer tests (no `datasets`, no downloads)."""

from __future__ import annotations

import torch


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int = 16, length: int = 8):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 90, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def token_dataset(seed: int = 0) -> torch.utils.data.Dataset:
    return _Tokens(seed)
