"""Atomic file output: everything is written to a temporary name in the target's folder, then renamed, so a
killed run never leaves a half-written file where a finished one is expected."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator


def _default_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's 0600 would surprise users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; rename it onto ``path`` if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.chmod(tmp, _default_mode())
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_dir(path: str, fill: Callable[[str], None]) -> None:
    """Have ``fill`` write a whole directory under a temporary name, then swap it in for ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        fill(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_dir(path: str) -> str | None:
    """None if ``path`` is a folder a file can be created in, or could be created; otherwise why not (one line).

    Probes by really creating (and removing) a file in ``path``, or in its nearest existing parent when it
    does not exist yet: ``os.access`` says yes to root everywhere, even on read-only mounts and in /proc.
    Leaves no folder behind, so a run that fails later on bad input has written nothing."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a directory"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".optspa-probe.", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        where = path if parent == path else f"cannot create {path}: {parent}"
        return f"{where} is not writable ({exc.strerror or type(exc).__name__})"
    return None
