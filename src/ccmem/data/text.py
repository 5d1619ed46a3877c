"""Long text: PG-19-style books (one book per text file), the King James Bible from Debian's ``bible-kjv`` as the
default stream, and training episodes cut from a token stream for the streaming adapter."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

from .episode import Episode

KJV_RANGES = {"all": "Genesis 1:1-Revelation 22:21", "old": "Genesis 1:1-Malachi 4:6",
              "new": "Matthew 1:1-Revelation 22:21"}


def read_books(path: str | Path) -> list[str]:
    """PG-19's format: a text file is one book; a folder holds one book per ``*.txt`` file (sorted by name)."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no book found at {path}: give a .txt file or a folder of .txt files")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def kjv_text(part: str = "all") -> str:
    """The King James Bible as plain text (``apt-get install bible-kjv`` provides the ``bible`` command)."""
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError("the default stream needs Debian's bible-kjv: apt-get install -y bible-kjv")
    out = subprocess.run([exe, KJV_RANGES[part]], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"^\d+\s+", "", ln.strip()) for ln in out.splitlines()]  # drop verse numbers
    return "\n".join(ln for ln in lines if ln)


def stream_episodes(tokens: list[int], n: int, steps: int = 2, chunk: int = 64, window: int = 96,
                    target: int = 32, seed: int = 0) -> list[Episode]:
    """Training episodes that look like the streaming cache: ``steps`` chunks of ``chunk`` tokens to compress, then
    ``window`` raw tokens (the input) and ``target`` tokens to predict. Offsets are drawn with a seeded RNG."""
    span = steps * chunk + window + target
    if len(tokens) < span:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one episode ({span})")
    r = random.Random(seed)
    out = []
    for _ in range(n):
        o = r.randrange(0, len(tokens) - span + 1)
        x = tokens[o:o + span]
        chunks = [x[i * chunk:(i + 1) * chunk] for i in range(steps)]
        rest = x[steps * chunk:]
        out.append(Episode(chunks, rest[:window], rest[window:], id=f"offset-{o}"))
    return out
