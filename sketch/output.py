"""Files blocksketch writes: whole or not at all, never over a file unasked, never onto an input.

Every command that writes a file (a manifest, a bundle, a stream, a ranges list, a filter, a heat
map) goes through :func:`atomic_output`:

- ``-`` means stdout, everywhere; nothing is checked or renamed then.
- An existing file is replaced only with ``force`` (the CLI's ``--force``), and never when it is
  one of the command's own inputs (same device and inode, whatever name or link leads to it):
  ``pack vm.img m -o vm.img`` must not turn the image into a bundle, even with ``--force``.
- The bytes go to a temporary file next to the output, created exclusively (``O_EXCL``, and
  ``O_NOFOLLOW``: a symlink planted at the temp name is not written through), synced, then
  renamed over the output; without ``force`` the rename is a hard link that fails if a file
  appeared meanwhile. Any failure removes the temporary file and leaves the output as it was.
- A write that fails (full disk, permission) is an :class:`OutputError` (exit 1), not a usage error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .errors import ForceNeeded, OutputError, UsageError

STDOUT = "-"


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_output(path: str, *, force: bool, inputs: Iterable[str] = (), what: str = "output") -> None:
    """Raise UsageError unless ``path`` may be written by a command reading ``inputs``."""
    if path == STDOUT:
        return
    if os.path.isdir(path):
        raise UsageError(f"cannot write {what} {path}: it is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {what} {path}: no such directory {directory}")
    target = _identity(path)
    if target is not None:
        for source in inputs:
            if source != STDOUT and _identity(source) == target:
                raise UsageError(f"{what} {path} is {'the same file as ' if source != path else ''}an input of this "
                                 f"command ({source}); write it somewhere else")
    if os.path.lexists(path) and not force:
        raise ForceNeeded(f"{what} {path} exists")


def temp_path(path: str, tag: str = "tmp") -> str:
    """A fresh hidden name next to ``path``: ``.NAME.TAG-PID-RANDOM``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def create_exclusive(path: str, mode: int = 0o644) -> int:
    """Open a new file at ``path`` for writing; fail if anything (a file, a symlink) is there."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


@contextlib.contextmanager
def atomic_output(path: str, *, force: bool, inputs: Iterable[str] = (), what: str = "output",
                  stdout: BinaryIO | None = None) -> Iterator[BinaryIO]:
    """A handle whose bytes become ``path`` once the block exits without an error (see the module).

    ``path`` ``-`` yields ``stdout`` (default: this process's binary stdout) and renames nothing.
    """
    if path == STDOUT:
        if stdout is None:
            import sys

            stdout = sys.stdout.buffer
        yield stdout
        stdout.flush()
        return
    inputs = list(inputs)
    check_output(path, force=force, inputs=inputs, what=what)
    temp = temp_path(path)
    try:
        fd = create_exclusive(temp)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        check_output(path, force=force, inputs=inputs, what=what)  # it may have appeared meanwhile
        if force:
            os.replace(temp, path)
        else:
            os.link(temp, path)  # no-clobber: fails if a file appeared since the check
        _sync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise ForceNeeded(f"{what} {path} exists") from None
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def write_atomic(path: str, data: bytes, *, force: bool, inputs: Iterable[str] = (), what: str = "output") -> None:
    """Write ``data`` as :func:`atomic_output` does."""
    with atomic_output(path, force=force, inputs=inputs, what=what) as handle:
        handle.write(data)


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
