"""Atomic, claimed, restartable writes: every output is claimed (a lock beside it), built under a
temporary name, then swapped in with one rename, so a crash never leaves a half artifact that
looks whole and the temporaries of a killed run are removed by the next run writing the same output.

Protocol for an output `d/name` (folder or file), all in `d/`:
- `.name.lock`: an flock held for the whole command. The kernel drops it when the process dies
  (kill -9 included), so a stale lock never blocks anyone; a live one makes a concurrent writer
  fail at once, before any work.
- `.name.tmp-<pid>-<rand>`: the new version being written. Complete, it is exchanged with `name`
  in one `renameat2(RENAME_EXCHANGE)` (Linux), else `name` -> `.name.old-<pid>-<rand>` and tmp ->
  `name` (a kill between the two renames is repaired by the next claim: the old version goes back).
- Under the lock, anything matching `.name.tmp-*` / `.name.old-*` is a leftover of a dead run:
  the claim removes it (see `stale_temporaries`, which `unpatch verify` reports).
OSErrors while writing (disk full, read-only folder, a base that vanished) become one-line
UnpatchErrors naming the path, with the temporary removed and the previous version untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import inspect
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UnpatchError

_HELD: dict[str, list] = {}  # resolved output -> [lock fd, depth]: claims are re-entrant within a process
_LEFTOVER = r"^\.{name}\.(tmp|old)-\d+-\w+$"


def check_out_path(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked; call before doing expensive work."""
    if Path(out).exists() and not overwrite:
        raise UnpatchError(f"{out}: already exists; choose another --out or pass --overwrite")


def _key(out: Path) -> str:
    return os.path.join(os.path.realpath(out.parent), out.name)


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def stale_temporaries(out: str | Path) -> list[Path]:
    """Temporaries beside `out` left by a killed writer (none while a live writer holds the lock)."""
    out = Path(out)
    if not out.parent.is_dir() or _busy(out):
        return []
    pat = re.compile(_LEFTOVER.format(name=re.escape(out.name)))
    return sorted(p for p in out.parent.iterdir() if pat.match(p.name))


def _busy(out: Path) -> bool:
    """Does another process hold the claim on `out` right now?"""
    if _key(out) in _HELD:
        return False
    try:
        fd = os.open(_lock_path(out), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _clean_stale(out: Path) -> None:
    """Under the lock: restore an old version a kill left renamed away, delete every other leftover."""
    pat = re.compile(_LEFTOVER.format(name=re.escape(out.name)))
    left = sorted((p for p in out.parent.iterdir() if pat.match(p.name)), key=lambda p: p.stat().st_mtime)
    olds = [p for p in left if ".old-" in p.name]
    if olds and not os.path.lexists(out):  # killed between the two renames of a fallback swap
        os.rename(olds[-1], out)
        left.remove(olds[-1])
    for p in left:
        _remove(p)


def _acquire(out: Path, wait: bool) -> int:
    lock = _lock_path(out)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UnpatchError(f"{out}: another unpatch command (pid {holder}) is writing it right now; "
                               "wait for it to finish or choose another --out") from None
        try:  # the holder before us may have unlinked the lock file: then ours is an orphan, retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def claim(out: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold `out` for this process: fail at once (one line) if another process is writing it,
    check that its folder is writable, remove a killed run's leftovers. Re-entrant; OSErrors
    raised inside become one-line UnpatchErrors naming the path."""
    out = Path(out)
    key = _key(out)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out, wait)
    except OSError as e:
        raise UnpatchError(f"{out}: cannot write in {out.parent} ({e.strerror or e}); choose an --out in a writable folder") from None
    _HELD[key] = [fd, 1]
    try:
        _clean_stale(out)
        yield out
    except OSError as e:
        raise UnpatchError(os_error_message(e, out)) from None
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(out))  # while still locked: a waiter re-checks the inode and retries
        os.close(fd)


def claims(target: Callable[[dict[str, Any]], str | Path | None]):
    """Decorator: run the function under `claim(target(its arguments))` (no claim when that is
    None), so a library call holds its output from its first line to its last."""
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            out = target(bound.arguments)
            with claim(out) if out is not None else contextlib.nullcontext():
                return fn(*args, **kwargs)
        return wrapper
    return deco


def os_error_message(e: BaseException, out: Path) -> str:
    """One line for an OS-level failure while producing `out`: the path, what happened, what to do."""
    code = getattr(e, "errno", None)
    if code is None and _no_space(e):
        code = errno.ENOSPC
    where = getattr(e, "filename", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{out}: no space left on the device of {out.parent} while writing; nothing was replaced; free space or choose another --out"
    if code == errno.EFBIG:
        return f"{out}: file too large for this file system or the size limit (ulimit -f); nothing was replaced; choose another --out"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where or out.parent}: not writable ({os.strerror(code)}); nothing was replaced; choose an --out in a writable folder"
    if code == errno.ENOENT and where and not str(where).startswith(str(out.parent / f".{out.name}.")):
        return f"{where}: vanished while the command ran (no such file); restore it and run the command again"
    msg = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"{where or out}: {msg} while writing {out}; nothing was replaced; fix that and run the command again"


def _no_space(e: BaseException) -> bool:
    """safetensors' Rust writer reports a full disk as a SafetensorError, not an OSError."""
    text = str(e)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text


_RENAME_EXCHANGE = 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        _remove(tmp)  # now the previous version
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(tmp, out)
        _remove(old)


@contextlib.contextmanager
def _writing(out: Path, overwrite: bool, wait: bool, make) -> Iterator[Path]:
    with claim(out, wait):
        check_out_path(out, overwrite)  # under the lock: a writer that finished meanwhile is seen
        tmp = make()
        try:
            yield tmp
        except OSError as e:
            _remove(tmp)
            raise UnpatchError(os_error_message(e, out)) from None
        except Exception as e:
            _remove(tmp)
            if _no_space(e):
                raise UnpatchError(os_error_message(e, out)) from None
            raise
        except BaseException:
            _remove(tmp)
            raise
        try:
            _swap_in(tmp, out)
        except OSError as e:
            _remove(tmp)
            raise UnpatchError(os_error_message(e, out)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MASK = _umask()  # read once: mkdtemp/mkstemp create 0700/0600, the output should get the usual modes


def _tmp_dir(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_MASK)
    return tmp


def atomic_dir(out: Path, overwrite: bool = False, wait: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.
    `wait`: queue behind a concurrent writer instead of failing (shared caches)."""
    out = Path(out)
    return _writing(out, overwrite, wait, lambda: _tmp_dir(out))


def _tmp_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_MASK)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a claimed temporary sibling and rename (replacing what was there)."""
    path = Path(path)
    with _writing(path, True, False, lambda: _tmp_file(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file via a claimed temporary sibling and rename."""
    atomic_write_bytes(path, text.encode("utf-8"))
