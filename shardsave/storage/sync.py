"""fsync on a background thread, so that the disk's work overlaps the writing of the next files."""

from __future__ import annotations

from pathlib import Path

from shardsave.storage.posix import fsync

__all__ = ["BackgroundSync"]


class BackgroundSync:
    """fsync finished files on one background thread while the caller writes the next ones, so the disk's work
    overlaps the writing instead of all coming at the end (`publish` fsyncs everything again before the rename,
    which costs little once the data is on disk). Use as a context manager: leaving it waits for every fsync
    and raises the first one's error."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardsave-fsync")
        self._pending: list = []

    def __call__(self, path: Path) -> None:
        self._pending.append(self._pool.submit(fsync, path))

    def __enter__(self) -> BackgroundSync:
        return self

    def __exit__(self, *exc) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
