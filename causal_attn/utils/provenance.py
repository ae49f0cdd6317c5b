"""What produced a result: the code (git revision, whether the tree was dirty, and a hash of the package's own
sources, which also tells apart uncommitted edits and installs without git) and the package versions.

Results files carry :func:`provenance`; resume logs key their runs by :func:`code_hash`, so a run made by other
code is never reused."""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from .layout import PACKAGE, folder
from .versions import versions

SOURCE_SUFFIXES = (".py", ".cpp", ".h")


def _sources() -> list[Path]:
    roots = [PACKAGE] + [f for f in (folder("kernels"), folder("csrc")) if f is not None and PACKAGE not in f.parents]
    files = []
    for root in roots:
        files += [p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts]
    return sorted(set(files))


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """16 hex digits over the paths and contents of the package's sources (causal_attn/, kernels/, csrc/)."""
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.relative_to(PACKAGE.parent).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_state() -> dict:
    """``{"git_revision": sha or None, "git_dirty": bool or None}`` of the checkout the package runs from (None
    for an install outside a git checkout, or without git)."""
    root = PACKAGE.parent
    if not (root / ".git").exists():
        return {"git_revision": None, "git_dirty": None}
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": None, "git_dirty": None}
    return {"git_revision": sha, "git_dirty": bool(status.strip())}


def provenance() -> dict:
    """Code and stack of this process, for a results file."""
    return {**git_state(), "code_hash": code_hash(), "versions": versions()}
