"""Long text: PG-19-style books (one book per text file), the King James Bible from Debian's ``bible-kjv`` as the
default stream, three more domains from Debian (Bierce's *The Devil's Dictionary*, the Python 3 documentation, the
``fortunes`` quotations), the chit-chat training dialogs as running text, and training episodes cut from a token
stream for the streaming adapter.

Every text is named by a spec (:func:`named_text`), so a recipe and a benchmark say which domains a streaming adapter
was trained and scored on."""

from __future__ import annotations

import gzip
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
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


DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")  # Debian's dict-devil
PYTHON_DOCS = "/usr/share/doc/python3*/html/_sources"  # Debian's python3.x-doc: the documentation's reST sources
PYTHON_DOC_SECTIONS = ("tutorial", "howto", "faq", "reference", "library", "using", "extending")


def devils_dictionary() -> str:
    """Ambrose Bierce, *The Devil's Dictionary* (1911, public domain; ``apt-get install dict-devil``): satirical
    definitions in early-1900s literary English, from the preface on."""
    if not DEVIL_DICT.is_file():
        raise FileNotFoundError(f"{DEVIL_DICT} is missing: apt-get install -y dict-devil")
    raw = gzip.decompress(DEVIL_DICT.read_bytes()).decode("utf-8", errors="replace")
    start = raw.find("PREFACE")
    if start < 0:
        raise ValueError(f"{DEVIL_DICT} does not hold The Devil's Dictionary (no PREFACE)")
    lines = [ln.strip() for ln in raw[start:].splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(ln for ln in lines if not ln.startswith("00-database")))


def python_docs(sections: tuple[str, ...] = PYTHON_DOC_SECTIONS) -> str:
    """The Python documentation's prose (``apt-get install python3.11-doc``): its reStructuredText sources with the
    directives, literal blocks and heading rules dropped and inline markup reduced to its text, one page after
    another in a fixed order."""
    import glob

    roots = sorted(glob.glob(PYTHON_DOCS))
    if not roots:
        raise FileNotFoundError(f"no Python documentation sources at {PYTHON_DOCS}: apt-get install -y python3.11-doc")
    root = Path(roots[-1])
    pages = [f for sec in sections for f in sorted((root / sec).rglob("*.rst.txt"))]
    if not pages:
        raise FileNotFoundError(f"{root} holds none of the sections {sections}")
    return "\n\n".join(filter(None, (rst_prose(f.read_text(encoding="utf-8", errors="replace")) for f in pages)))


def rst_prose(src: str) -> str:
    """The running text of one reStructuredText page: paragraphs only (no directive with its indented body, no
    literal block after ``::``, no heading underline), roles and inline literals replaced by their text."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a directive or literal block: skip lines indented deeper than this
    for line in src.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".. ") or stripped == "..":
            skip_indent = indent
            continue
        if stripped and len(set(stripped)) == 1 and stripped[0] in "=-~^*#+`'\"":
            continue  # a heading's underline or overline
        if stripped.startswith((">>>", "...", "+-", "+=", "|")):
            continue  # interactive examples, grid tables
        if stripped.endswith("::"):
            skip_indent = indent
            stripped = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
        text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`", r"\1", stripped)  # :func:`x <y>` -> x
        text = re.sub(r"``([^`]*)``", r"\1", text)
        text = re.sub(r"`([^`<]*?)(?:\s*<[^`>]*>)?`_{0,2}", r"\1", text)
        text = text.replace("**", "")
        out.append(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


FORTUNES = Path("/usr/share/games/fortunes")  # Debian's fortunes (and fortunes-min)
# the jars left out: ascii-art is not prose; definitions quotes The Devil's Dictionary, a held-out scoring text
FORTUNE_JARS_LEFT_OUT = ("ascii-art", "definitions")
# a fortune quoting a held-out scoring text (Bierce, or a Bible verse by book and chapter) is dropped
HELD_OUT_QUOTE = re.compile(
    r"Bierce|Devil's Dictionary|\bBible\b|\b(Genesis|Exodus|Leviticus|Deuteronomy|Psalms?|Proverbs|Ecclesiastes|"
    r"Isaiah|Jeremiah|Matthew|Mark|Luke|John|Acts|Romans|Corinthians|Galatians|Ephesians|Hebrews|James|Peter|"
    r"Revelations?)\s+\d+:\d+", re.IGNORECASE)


def fortunes_text(root: Path = FORTUNES) -> str:
    """The quotations of Debian's ``fortunes`` (literature, humour, science, politics, songs and poems, ...) as
    running text, jar by jar in name order, one quotation per paragraph: a broad modern-English mix for training a
    streaming adapter that must generalise. Leaves out what overlaps a held-out scoring text (:data:`HELD_OUT_QUOTE`,
    :data:`FORTUNE_JARS_LEFT_OUT`)."""
    jars = sorted(f for f in root.glob("*") if f.is_file() and not f.suffix and f.name not in FORTUNE_JARS_LEFT_OUT)
    if not jars:
        raise FileNotFoundError(f"no fortune jars in {root}: apt-get install -y fortunes")
    out = []
    for jar in jars:
        for quote in jar.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln.strip() for ln in quote.strip("%\n").splitlines()]
            text = "\n".join(ln for ln in lines if ln)
            if text and not HELD_OUT_QUOTE.search(text):
                out.append(text)
    return "\n\n".join(out)


def chitchat_text(split: str = "train", split_seed: int = 0) -> str:
    """The chit-chat corpus's dialogs of one split as running ``A: / B:`` text, one dialog after another: the split
    is by conversation id (as every dialog recipe's), so a train-split stream never holds an evaluation dialog."""
    from .dialog import split_dialogs
    from .sources import load_chitchat

    dialogs, _ = load_chitchat()
    parts = split_dialogs(dialogs, seed=split_seed)
    if split not in parts:
        raise ValueError(f"unknown chit-chat split {split!r}; known: {sorted(parts)}")
    return "\n\n".join("\n".join(f"{'AB'[i % 2]}: {t.strip()}" for i, t in enumerate(d.turns)) for d in parts[split])


TEXTS = {
    "kjv": "the King James Bible; kjv:all|old|new (Debian bible-kjv)",
    "devil": "Bierce's The Devil's Dictionary (Debian dict-devil)",
    "pydocs": "the Python documentation's prose; pydocs:tutorial,howto,... for some sections (Debian python3.11-doc)",
    "chitchat": "the chit-chat dialogs of one split as A:/B: text; chitchat:train|validation|test",
    "fortunes": "the quotations of Debian's fortunes, without Bierce or Bible verses (Debian fortunes)",
}


def named_text(spec: str) -> str:
    """A long text by name (:data:`TEXTS`: ``kjv:new``, ``devil``, ``pydocs``, ``chitchat:train``, ``fortunes``) or a
    PG-19-style ``.txt`` file or folder of books."""
    name, _, arg = str(spec).partition(":")
    if name == "kjv":
        if (arg or "all") not in KJV_RANGES:
            raise ValueError(f"unknown KJV part {arg!r} in {spec!r}; known: {sorted(KJV_RANGES)}")
        return kjv_text(arg or "all")
    if name == "devil":
        return devils_dictionary()
    if name == "pydocs":
        return python_docs(tuple(arg.split(",")) if arg else PYTHON_DOC_SECTIONS)
    if name == "chitchat":
        return chitchat_text(arg or "train")
    if name == "fortunes":
        return fortunes_text()
    if not Path(spec).exists():
        raise FileNotFoundError(f"text {spec!r} is neither a known name ({', '.join(TEXTS)}) nor a .txt file or "
                                "folder of books")
    return "\n".join(read_books(spec))


def stream_episodes(tokens: list[int], n: int, steps: int | Sequence[int] = 2, chunk: int = 64,
                    window: int | Sequence[int] = 96, target: int = 32, seed: int = 0) -> list[Episode]:
    """Training episodes that look like the streaming cache: ``steps`` chunks of ``chunk`` tokens to compress, then
    ``window`` raw tokens (the input) and ``target`` tokens to predict. Offsets are drawn with a seeded RNG.

    ``steps`` and ``window`` may be ranges ``[lo, hi]`` (inclusive), drawn per episode: the streaming cache holds 1 to
    ``mem_slots / n_tok`` compressed chunks and predicts after 96 to 160 raw tokens, so fixed values train one corner
    of what it meets."""
    lo_steps, hi_steps = _span_range("steps", steps, 1)
    lo_win, hi_win = _span_range("window", window, 0)
    longest = hi_steps * chunk + hi_win + target
    if len(tokens) < longest:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one episode ({longest})")
    r = random.Random(seed)
    out = []
    for _ in range(n):
        s = r.randint(lo_steps, hi_steps) if lo_steps != hi_steps else lo_steps
        w = r.randint(lo_win, hi_win) if lo_win != hi_win else lo_win
        span = s * chunk + w + target
        o = r.randrange(0, len(tokens) - span + 1)
        x = tokens[o:o + span]
        chunks = [x[i * chunk:(i + 1) * chunk] for i in range(s)]
        rest = x[s * chunk:]
        out.append(Episode(chunks, rest[:w], rest[w:], id=f"offset-{o}"))
    return out


def _span_range(name: str, value: int | Sequence[int], least: int) -> tuple[int, int]:
    """``value`` as an inclusive range: an int is ``[value, value]``; a range must be two ints ``least <= lo <= hi``."""
    lo, hi = (value, value) if isinstance(value, int) else tuple(value) if len(value) == 2 else (None, None)
    if not (isinstance(lo, int) and isinstance(hi, int)) or not least <= lo <= hi:
        raise ValueError(f"data.{name} must be an int >= {least} or a range [lo, hi] with {least} <= lo <= hi, "
                         f"got {value!r}")
    return lo, hi
