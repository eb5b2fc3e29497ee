"""Atomic file writes: the one way onnxgrad writes a file (exports, checkpoints, weights, dumps).

A reader, or the next run after a crash, sees either the old file or the complete new one, never
a half-written file:

1. a temporary file is created beside the target (same folder, so the final rename stays within
   one file system), named ``.<target name>.og-<host>-<pid>-<random>.tmp``: the host (a short
   hash of its name) and process that own it;
2. the caller writes it, through a file object (:func:`atomic_file`, for ``np.savez``) or by its
   path (:func:`atomic_path`, for ``onnx.save_model`` and ``safetensors``);
3. it is flushed and fsynced, so the data is on disk before any name points at it;
4. it gets the permissions a plain ``open(target, "w")`` would give: a new file is created with
   mode 0o666 and the kernel applies the umask (and a folder's default ACL) itself, exactly as
   for a normal write; a replaced file keeps its mode;
5. ``os.replace`` renames it over the target (atomic on POSIX and Windows), and the folder is
   fsynced so that the rename itself survives a power loss (POSIX; best effort).

Any error or interrupt (``KeyboardInterrupt`` included) before the rename removes the temporary
file and leaves the target as it was. A process killed mid-write (SIGKILL, power loss) cannot
clean up; the next write into the same folder does (POSIX): it removes the temporary files whose
owner process on this host no longer exists. Files of live processes, of other hosts sharing
the folder, and of other programs are never touched. A folder, or a missing or read-only
folder, as the target fails before anything is created, naming the path. A target that is a symbolic link is written where the link
points, and the link is kept, as a normal write would.

Errors raised by the caller's own writing (a full disk inside ``onnx.save_model``) propagate
unchanged; failures of the steps above raise :class:`FileWriteError`, which names the target,
not the temporary file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["FileWriteError", "atomic_file", "atomic_path", "atomic_paths", "atomic_write",
           "write_target"]

_NEW_FILE_MODE = 0o666  # what open(path, "w") asks for; the kernel subtracts the umask
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation on the raw descriptor
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # a subprocess (Graphviz) must not inherit the temp file
# This host's tag in temporary names: a process id means something only on the host it ran on.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(rf"^\..+\.og-{_HOST}-(\d+)-[0-9a-f]{{8}}\.tmp$")


class FileWriteError(OSError):
    """A file could not be written: ``str()`` names the target and the reason in one line.

    An ``OSError`` (with the original ``errno``), so code catching ``OSError`` keeps working.
    """

    def __init__(self, target: str | os.PathLike[str], reason: str,
                 code: int | None = None) -> None:
        super().__init__(code, reason, os.fspath(target))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def atomic_write(path: str | os.PathLike[str], data: bytes, *,
                 make_folder: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path written."""
    with atomic_file(path, make_folder=make_folder) as f:
        f.write(data)
    return Path(path)


@contextmanager
def atomic_file(path: str | os.PathLike[str], *,
                make_folder: bool = False) -> Iterator[BinaryIO]:
    """A binary file object to write; on a clean exit it replaces ``path`` atomically.

    ``make_folder=True`` creates missing parent folders first.
    """
    # The temporary file exists, empty: "r+b" opens it without creating another one.
    with atomic_paths(path, make_folder=make_folder) as (tmp,), open(tmp, "r+b") as f:
        yield f
        _flush(f, path)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *,
                make_folder: bool = False) -> Iterator[Path]:
    """The path of a temporary file to write by name; on a clean exit it replaces ``path``.

    For writers that take a file name (``onnx.save_model``, ``safetensors``). The file exists,
    empty, in the target's folder; the writer may overwrite or truncate it.
    """
    with atomic_paths(path, make_folder=make_folder) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(*paths: str | os.PathLike[str],
                 make_folder: bool = False) -> Iterator[tuple[Path, ...]]:
    """One temporary path per target; on a clean exit each replaces its target, in order.

    For a file that refers to another (a model and its external-data file). Every temporary file
    is written and fsynced before the first rename, so a failure while writing leaves every target
    untouched. Pass the referenced file first: once the renames start, it is in place before the
    file that points at it.

    NOTE: the set is not atomic as a whole; each rename is. Between the renames (microseconds, or
    forever after a crash there) a reader can see the new first file with the old second one.
    """
    targets = [write_target(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            temps.append(_create_temp(target, make_folder))
        yield tuple(temps)
        for tmp, target in zip(temps, targets):
            _finish(tmp, target)
        for tmp, target in zip(temps, targets):
            _replace(tmp, target)
    except BaseException:
        for tmp in temps:
            try:
                tmp.unlink(missing_ok=True)  # already renamed: missing, nothing to remove
            except OSError:
                pass  # the original error matters more than a leftover we cannot remove
        raise
    for folder in dict.fromkeys(target.parent for target in targets):
        _fsync_folder(folder)


def write_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces: ``path``, or the file a symbolic link points at.

    NOTE: replacing a symbolic link would turn it into a regular file; a normal write goes
    through the link, so the temporary file is made beside the file the link points at.
    """
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _create_temp(target: Path, make_folder: bool) -> Path:
    folder = target.parent
    if target.is_dir():
        raise FileWriteError(target, "it is a folder", errno.EISDIR)
    if make_folder:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileWriteError(target, f"cannot create its folder {folder}: "
                                 f"{_reason(exc)}", exc.errno) from None
    _remove_orphans(folder)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY | _CLOEXEC
    for _ in range(100):
        tmp = folder / f".{target.name}.og-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            # NOTE: not tempfile.mkstemp, whose 0600 would need a chmod computed from the umask
            # (readable only by setting it, racing other threads); the kernel applies it here.
            fd = os.open(tmp, flags, _NEW_FILE_MODE)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _folder_error(target, exc) from None
        os.close(fd)
        return tmp
    raise FileWriteError(target, f"no free temporary name in {folder}", errno.EEXIST)


def _remove_orphans(folder: Path) -> None:
    """Remove the temporary files of writers on this host that died before their rename."""
    if os.name != "posix":
        return  # NOTE: Windows' os.kill(pid, 0) would terminate the process, not probe it
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return  # a missing or unreadable folder: creating the temporary file reports it
    me = os.getpid()
    for name in entries:
        match = _TEMP.match(name)
        if match is None or int(match.group(1)) == me or _alive(int(match.group(1))):
            continue
        try:
            (folder / name).unlink()
        except OSError:
            pass  # another writer removed it first, or the folder is read-only


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user (EPERM), or cannot tell: keep its file
    return True


def _folder_error(target: Path, exc: OSError) -> FileWriteError:
    folder = target.parent
    if isinstance(exc, FileNotFoundError) or not folder.exists():
        reason = f"no such folder {folder}"
    elif not folder.is_dir():
        reason = f"{folder} is not a folder"
    elif isinstance(exc, PermissionError):
        reason = f"permission denied in folder {folder}"
    else:
        reason = f"{_reason(exc)} (in folder {folder})"
    return FileWriteError(target, reason, exc.errno)


def _reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else str(exc)


def _flush(f: BinaryIO, target: str | os.PathLike[str]) -> None:
    try:
        f.flush()  # the fsync follows in _finish
    except OSError as exc:  # a full disk often shows only here
        raise FileWriteError(target, _reason(exc), exc.errno) from None


def _finish(tmp: Path, target: Path) -> None:
    """The temporary file's final mode and an fsync of its data."""
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None  # a new file: the mode it was created with is a normal write's
    except OSError as exc:
        raise FileWriteError(target, _reason(exc), exc.errno) from None
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        # A writer that wrote by name has closed its file; fsync through a descriptor of ours.
        fd = os.open(tmp, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FileWriteError(target, _reason(exc), exc.errno) from None


def _replace(tmp: Path, target: Path) -> None:
    try:
        os.replace(tmp, target)
    except OSError as exc:
        if target.is_dir():
            raise FileWriteError(target, "it is a folder", exc.errno) from None
        raise FileWriteError(target, _reason(exc), exc.errno) from None


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX; best effort: Windows cannot open a folder for fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
