"""The user cache shared by everything the package builds once and reuses: the compiled C++ CPU kernel and
the dequantised weights of GGUF checkpoints. Root: ``$CAUSAL_ATTN_CACHE_DIR``, else
``$XDG_CACHE_HOME/causal_attn``, else ``~/.cache/causal_attn``."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("CAUSAL_ATTN_CACHE_DIR"):
        return Path(os.environ["CAUSAL_ATTN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "causal_attn"


class FileLock:
    """Exclusive flock on ``path``; says once on stderr, naming ``waiting_for``, when it has to wait."""

    def __init__(self, path: Path, waiting_for: str):
        self.path = path
        self.waiting_for = waiting_for

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"causal_attn: waiting for another process {self.waiting_for} in {self.path.parent}",
                  file=sys.stderr, flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock
