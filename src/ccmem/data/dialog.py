"""Dialogs as episodes: the last turn is the target, the one before it the uncompressed input, earlier turns the
compressed context (method.md §7.2). Turns are rendered as ``A: text`` / ``B: text`` lines."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .episode import Episode


@dataclass(frozen=True)
class Dialog:
    id: str
    turns: tuple[str, ...]


class DialogFormat:
    """Turns text into token ids. Each piece is tokenised on its own, so the full-context and compressed layouts of
    one episode hold exactly the same text tokens."""

    def __init__(self, tokenizer: Any, speakers: tuple[str, str] = ("A", "B")):
        self.tok = tokenizer
        self.speakers = speakers
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._cache: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        if text not in self._cache:  # episodes re-cut the same turns every epoch
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return list(self._cache[text])

    def line(self, i: int, text: str) -> str:
        """The plain text of turn i (0-based): ``A: text\\n``."""
        return f"{self.speakers[i % 2]}: {text.strip()}\n"

    def turn(self, i: int, text: str, k: int | None = None) -> list[int]:
        """``A: text\\n`` for turn i (0-based) of a dialog cut to ``k`` turns (plain lines ignore ``k``)."""
        return self._enc(self.line(i, text))

    def prompt(self, i: int) -> list[int]:
        """What opens turn ``i`` before its text: the replying speaker's ``B:``."""
        return self._enc(f"{self.speakers[i % 2]}:")

    def reply(self, text: str, eos: bool = True) -> list[int]:
        """The text of a target turn after :meth:`prompt`, ending with EOS when ``eos``."""
        return self._enc(f" {text.strip()}\n") + (self.eos if eos else [])

    def episode(self, dialog: Dialog, k: int, eos: bool = True) -> Episode:
        """Episode over the first ``k`` turns (k >= 2): turns 1..k-2 compressed, k-1 input, k the target."""
        if not 2 <= k <= len(dialog.turns):
            raise ValueError(f"k={k} must lie in [2, {len(dialog.turns)}] for dialog {dialog.id}")
        chunks = [self.turn(i, t, k) for i, t in enumerate(dialog.turns[: k - 2])]
        inp = self.turn(k - 2, dialog.turns[k - 2], k) + self.prompt(k - 1)
        return Episode(chunks, inp, self.reply(dialog.turns[k - 1], eos), id=f"{dialog.id}:{k}")


class TemplateFormat(DialogFormat):
    """Dialog turns as chat messages in the tokenizer's own chat template (ChatML for SmolLM2): the target turn is
    the assistant's, the turns before it alternate user / assistant backwards from it, and the first turn of the
    dialog carries the template's opening (its default system prompt). One message is one chunk, as in
    :meth:`ccmem.session.Session.add_message`; the target ends at the end-of-turn token."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        from ..chat_template import generation_prompt_ids

        self.gen = generation_prompt_ids(tokenizer)

    def _message(self, text: str, role: str, first: bool) -> list[int]:
        from ..chat_template import message_ids

        key = f"{role}:{int(first)}:{text}"
        if key not in self._cache:
            self._cache[key] = message_ids(self.tok, {"role": role, "content": text.strip()}, first)
        return list(self._cache[key])

    def turn(self, i: int, text: str, k: int | None = None) -> list[int]:
        """Turn i of a dialog cut to k turns (its role depends on k: turn k-1 is the assistant's)."""
        role = "assistant" if ((k if k is not None else i + 1) - 1 - i) % 2 == 0 else "user"
        return self._message(text, role, first=i == 0)

    def prompt(self, i: int) -> list[int]:
        """The assistant's generation prompt (the target turn is always the assistant's)."""
        return list(self.gen)

    def reply(self, text: str, eos: bool = True) -> list[int]:
        """The assistant message after its generation prompt, ending at the end-of-turn token when ``eos``."""
        full = self._message(text, "assistant", first=False)
        if full[: len(self.gen)] != self.gen:
            raise ValueError("the chat template's assistant message does not start with its generation prompt")
        out = full[len(self.gen):]
        if self.eos and self.eos[0] in out:  # the reply ends at the end-of-turn token
            out = out[: out.index(self.eos[0]) + 1]
        if not eos and out and self.eos and out[-1] == self.eos[0]:
            out = out[:-1]
        return out


FORMATS = {"plain": DialogFormat, "template": TemplateFormat}


CUTS = ("uniform", "end")


class DialogEpisodes:
    """Training view of dialogs: item i at epoch e is dialog i cut to k turns. ``cut="uniform"``: k uniform in
    [3, len], so every time step t = k - 2 of the dialog is trained equally (drawn from an RNG seeded by
    (seed, epoch, i): the data order is a pure function of the step and resumes exactly); ``cut="end"``: the
    dialog's natural end, k = len (only the longest recurrence of each dialog)."""

    def __init__(self, dialogs: Sequence[Dialog], fmt: DialogFormat, seed: int = 0, min_turns: int = 3,
                 cut: str = "uniform"):
        if cut not in CUTS:
            raise ValueError(f"cut must be one of {CUTS}, got {cut!r}")
        self.dialogs = [d for d in dialogs if len(d.turns) >= min_turns]
        self.fmt, self.seed, self.min_turns, self.cut = fmt, seed, min_turns, cut

    def __len__(self) -> int:
        return len(self.dialogs)

    def get(self, i: int, epoch: int = 0) -> Episode:
        d = self.dialogs[i]
        if self.cut == "end":
            return self.fmt.episode(d, len(d.turns))
        k = random.Random(f"{self.seed}:{epoch}:{i}").randint(self.min_turns, len(d.turns))
        return self.fmt.episode(d, k)


def split_dialogs(dialogs: Sequence[Dialog], seed: int = 0, test: float = 0.1, val: float = 0.05,
                  group: Callable[[Dialog], str] | None = None) -> dict[str, list[Dialog]]:
    """Split by conversation id with a seeded hash, so a conversation never crosses splits and the split does not
    depend on the order or number of dialogs. ``group`` maps a dialog to the unit that is split instead (a play, an
    episode): dialogs of one group land in one split, so a held-out group's characters and plot stay unseen."""
    out: dict[str, list[Dialog]] = {"train": [], "validation": [], "test": []}
    for d in dialogs:
        key = d.id if group is None else group(d)
        u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        out["test" if u < test else "validation" if u < test + val else "train"].append(d)
    return out


class Weighted:
    """A source read ``weight`` times per epoch, so a mix can weigh a part without changing its data. Epoch e of the
    weighted source is positions [e*m, (e+1)*m) (m = round(weight * len)) of the source's endless stream: its epoch
    0 in a shuffled order (seeded by ``seed``), then its epoch 1 in another, and so on. Weight 3 sees every item
    three times an epoch, under three of the source's epochs (a dialog source with ``cut: uniform`` cuts each at
    other turns each time); weight 0.5 half of them, the other half in the next."""

    def __init__(self, source: Any, weight: float, seed: int | str = 0):
        self.source, self.weight, self.n, self.seed = source, self.check(weight), len(source), seed
        if self.n == 0:
            raise ValueError("an empty source cannot be weighted")
        self.m = max(1, round(self.weight * self.n))
        self._orders: dict[int, list[int]] = {}

    @staticmethod
    def check(weight: Any) -> float:
        """``weight`` as a float, or ValueError if it is not a finite number > 0."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"a part's weight must be a finite number > 0, got {weight!r}")
        return float(weight)

    def __len__(self) -> int:
        return self.m

    def get(self, i: int, epoch: int = 0) -> Episode:
        e, k = divmod(epoch * self.m + i, self.n)
        k = self._order(e)[k]
        return self.source.get(k, e) if hasattr(self.source, "get") else self.source[k]

    def _order(self, epoch: int) -> list[int]:
        """The order the source's epoch ``epoch`` is read in (a batch spans few epochs: the newest few are kept)."""
        if epoch not in self._orders:
            perm = list(range(self.n))
            random.Random(f"{self.seed}:weighted:{epoch}").shuffle(perm)
            self._orders[epoch] = perm
            if len(self._orders) > math.ceil(self.weight) + 2:
                del self._orders[min(self._orders)]
        return self._orders[epoch]


def part_of(starts: Sequence[int], i: int) -> int:
    """Which part item ``i`` of a mix belongs to, given where each part starts (``starts[-1]``: the mix's size)."""
    import bisect

    return bisect.bisect_right(starts, i) - 1


class Mixture:
    """Several indexable sources as one: item i belongs to the source whose index range holds it (so the mix ratio
    is the ratio of the sources' sizes, and the trainer's per-epoch shuffle interleaves them). ``names`` (one per
    source, unique) and ``starts`` let the trainer log each source's loss apart (:func:`part_of`)."""

    def __init__(self, parts: Sequence[Any], names: Sequence[str] | None = None):
        if not parts:
            raise ValueError("a mixture needs at least one source")
        self.parts = list(parts)
        self.names = list(names) if names is not None else [f"part{j}" for j in range(len(self.parts))]
        if len(self.names) != len(self.parts) or len(set(self.names)) != len(self.names):
            raise ValueError(f"a mixture needs one unique name per source; got {self.names} for {len(self.parts)}")
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + len(p))

    def __len__(self) -> int:
        return self.starts[-1]

    def get(self, i: int, epoch: int = 0) -> Episode:
        j = part_of(self.starts, i)
        part, k = self.parts[j], i - self.starts[j]
        return part.get(k, epoch) if hasattr(part, "get") else part[k]
