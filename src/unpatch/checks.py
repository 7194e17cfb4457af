"""Range checks for the numbers a user types (scales, factors, coefficients, rates, limits, ranks)
and for the files a command opens: each failure is one UnpatchError naming the option or file.

Why here and not in typer: typer only checks the type, and `float("nan")`, `float("inf")` parse
fine; a NaN scale then writes a model whose tensors are all NaN. The commands call these before
loading anything, so a bad number costs nothing.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .errors import UnpatchError

HUB_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"  # a Hub repo id, owner/name, as the Hub allows the characters
HUB_ID = re.compile(rf"^{HUB_REPO}$")

# |scale| beyond this is a typo (1e6 for 1e-6), never a dose: a patch scaled by 1000 already
# moves weights by 1000x what training found; the ranges below are as generous as that
SCALE_MAX = 1000.0
LR_MAX = 1.0  # AdamW above lr 1 diverges on any model
RANK_MAX = 4096  # larger than any layer width it could factor usefully
COUNT_MAX = 10_000_000  # steps, limits, batch sizes, tokens


def finite(value: float, option: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, nonzero: bool = False) -> float:
    """`value` as a float, or an UnpatchError `--option value: must be ...`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UnpatchError(f"{option} {value!r}: not a number") from None
    if not math.isfinite(v):
        raise UnpatchError(f"{option} {value!r}: must be a finite number (not NaN or infinite)")
    if nonzero and v == 0:
        raise UnpatchError(f"{option} {value!r}: must not be 0")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise UnpatchError(f"{option} {value!r}: must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and v > hi:
        raise UnpatchError(f"{option} {value!r}: must be <= {hi:g}")
    return v


def scale(value: float, option: str = "--scale") -> float:
    """A multiplier of a patch (scale, factor, coefficient): finite, |value| <= SCALE_MAX."""
    v = finite(value, option)
    if abs(v) > SCALE_MAX:
        raise UnpatchError(f"{option} {value!r}: must be between -{SCALE_MAX:g} and {SCALE_MAX:g}")
    return v


def scales(values: Iterable[float] | None, option: str = "--scale") -> list[float]:
    return [scale(v, option) for v in values or []]


def lr(value: float, option: str = "--lr") -> float:
    return finite(value, option, lo=0, hi=LR_MAX, lo_open=True)


def count(value: int | None, option: str, lo: int = 0, hi: int = COUNT_MAX) -> int | None:
    """An integer option (steps, limit, batch size) within [lo, hi]; None passes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnpatchError(f"{option} {value!r}: must be a whole number")
    if value < lo or value > hi:
        raise UnpatchError(f"{option} {value}: must be between {lo} and {hi}")
    return value


def rank(value: int, option: str = "--rank") -> int:
    return count(value, option, lo=1, hi=RANK_MAX)


def regular_file(path: Path, what: str = "") -> Path:
    """`path` must be a regular file (not a FIFO, socket or device, which would block or never
    end when read); symlinks are followed here, callers that must stay inside a folder use
    `inside`. Raises only for special files: a missing path is the caller's concern."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise UnpatchError(f"{path}: cannot read ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise UnpatchError(f"{path}: is {kind}, not a regular file{' ' + what if what else ''}; replace it with the real file")
    return path


def option_values(metric: str, fn, options: dict) -> None:
    """Each metric option must have the type the metric's function declares (`limit: abc` would
    otherwise reach the metric, or be dropped); numbers finite, a limit >= 1."""
    import typing

    from pydantic import TypeAdapter, ValidationError

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that needs an optional import: leave that metric's types to itself
        return
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UnpatchError(f"metric {metric!r}: option {name!r} must be a finite number (got {value!r})")
        if name == "limit" and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UnpatchError(f"metric {metric!r}: option 'limit' must be >= 1 or null for all (got {value!r})")
        hint = hints.get(name)
        if hint is None:
            continue
        try:
            adapter = TypeAdapter(hint)
        except Exception:  # an internal type (e.g. cached reference log-probs) no YAML value can be
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError:
            want = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise UnpatchError(f"metric {metric!r}: option {name!r} must be {want} (got {value!r})") from None


def own_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if it is a regular file of the folder itself; None if absent. A symlink is
    refused by name unless it points inside the folder, or into the blobs of the Hugging Face
    cache repo the folder is a snapshot of (`<repo>/snapshots/<rev>/x -> ../../blobs/<hash>`):
    a README.md linked to ~/.ssh/id_rsa must never be uploaded or copied into a patch."""
    p = folder / name
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        target, home = p.resolve(), folder.resolve()
        roots = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
        if not any(target.is_relative_to(r) for r in roots):
            raise UnpatchError(f"{p}: is a symlink to {target}, outside the patch; a patch holds only its own files, "
                               "replace the link with a copy of the file or remove it")
        st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise UnpatchError(f"{p}: is not a regular file; remove it from the patch folder")
    return p


def assignment(item: str) -> tuple[str | None, Any]:
    """`key=value` as the CLI takes it (`--set`, `--metric-opt`): (key as typed, value read as YAML:
    100, null, [a, b]; what is no YAML stays text), or (None, None) without an `=`."""
    key, sep, value = item.partition("=")
    if not sep:
        return None, None
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key, value
