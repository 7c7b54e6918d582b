"""Writing folders so that nothing is half-written or silently replaced.

Every command that writes a dataset or a model folder stages it next to its target and renames it into place at
the end; `sigterm_as_interrupt` makes a SIGTERM (a cluster's job killer, `kill`) unwind through the same cleanup
as Ctrl-C, which Python only does for SIGINT by default.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from nnunetv2_pemma.errors import PemmaError


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so `finally`/`except BaseException` cleanup runs)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def replace_folder(staged: Path, target: Path, overwrite: bool, what: str) -> None:
    """Move a fully written `staged` folder to `target`.

    An existing target is an error unless `overwrite`; then it is replaced as a whole (never merged: an old
    checkpoint_best.pth must not survive beside new weights), by two renames on the same filesystem.
    """
    if target.exists() and not overwrite:
        raise PemmaError(f"{what} {target} already exists; pass --overwrite to replace it")
    if not target.exists():
        staged.rename(target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    try:
        staged.rename(target)
    except BaseException:  # e.g. a SIGTERM between the two renames: put the old folder back
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
