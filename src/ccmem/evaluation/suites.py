"""Evaluation suites: which contexts and queries are read at each time step t, and how their log-likelihoods turn
into the suite's metric. A suite knows nothing about methods; the runner scores every method on the same groups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..metrics import multiple_choice
from .core import Budget, per_unit


@dataclass
class Query:
    input: list[int]
    targets: list[list[int]]  # one target (language modelling) or the answer options
    answer: int | None = None


@dataclass
class Group:
    """One context (chunks c(1..t)) and the queries read on top of its memory."""

    id: str
    chunks: list[list[int]]
    queries: list[Query]
    calibration: list[Query] = field(default_factory=list)  # the options after "Output:" alone (acc_base)


Scores = list[list[list[tuple[float, int]]]]  # [group][query][target] -> (summed loglik, tokens)


class Suite:
    name: str
    metric: str
    higher_is_better: bool
    ts: tuple[int, ...]

    def groups(self, t: int) -> list[Group]:
        raise NotImplementedError

    def steps(self, t: int) -> int:
        """Context chunks read at time step ``t`` (the KV budget of the training-free methods is n_tok per chunk)."""
        return t

    def aggregate(self, groups: list[Group], scores: Scores, calib: Scores | None) -> dict[str, Any]:
        raise NotImplementedError

    def resample(self, groups: list[Group], scores: Scores, calib: Scores | None, rng: Any
                 ) -> tuple[list[Group], Scores, Scores | None]:
        """One bootstrap draw of the suite's units (here: contexts, with replacement); see :mod:`.intervals`."""
        from .intervals import resample_groups

        return resample_groups(groups, scores, calib, rng)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _dialog_pool(tokenizer: Any, source: str, split_seed: int, format: str, splits: Sequence[str]
                 ) -> tuple[list[Any], Any]:
    """(held-out dialogs, their format): the named splits of the chit-chat corpus, every dialog of a script source
    (:mod:`ccmem.data.scripts`, for adapters that never trained on it), or, as ``<source>:test``, the runs of its
    held-out plays / episodes only (the fixed split a recipe's script part trains beside; ``splits`` and
    ``split_seed`` name chit-chat splits and do not apply to scripts)."""
    from ..data.scripts import parse_dialogs, script_dialogs, script_splits
    from ..recipe import chitchat_splits, dialog_format

    cfg = {"split_seed": split_seed, "max_turn_tokens": 128, "format": format}
    if source == "chitchat":
        parts, fmt, _ = chitchat_splits(tokenizer, cfg)
        return [d for s in splits for d in parts[s]], fmt
    name, split = parse_dialogs(source)
    if split is not None:
        return script_splits(name, tokenizer, max_turn_tokens=128)[split], dialog_format(tokenizer, cfg)
    return script_dialogs(name, tokenizer, max_turn_tokens=128), dialog_format(tokenizer, cfg)


def _pool_name(source: str, split: str, split_seed: int) -> str:
    if source == "chitchat":
        return f"chit-chat {split} (split seed {split_seed})"
    from ..data.scripts import parse_dialogs

    name, part = parse_dialogs(source)
    if part is not None:
        return (f"{name} two-party runs of the held-out quarter of plays / episodes "
                "(ccmem.data.scripts.script_splits)")
    return f"{source} two-party runs (a held-out dialog domain: ccmem.data.scripts)"


class ChitchatSuite(Suite):
    """Next-turn perplexity (EOS excluded) after t compressed turns of held-out chit-chat dialogs (method.md §7.2:
    chunks u_1..u_t, input u_{t+1}, output u_{t+2})."""

    name, metric, higher_is_better = "chitchat", "ppl", False

    def __init__(self, tokenizer: Any, dialogs: int = 100, ts: Sequence[int] = (1, 2, 4, 8, 12), split_seed: int = 0,
                 format: str = "plain", source: str = "chitchat"):
        self.ts, self.eos, self.format, self.source = tuple(ts), tokenizer.eos_token_id, format, source
        held_out, self.fmt = _dialog_pool(tokenizer, source, split_seed, format, ["test", "validation"])
        need = max(self.ts) + 2
        pool = [d for d in held_out if len(d.turns) >= need]
        self.dialogs, self.split_seed = pool[:dialogs], split_seed

    def groups(self, t: int) -> list[Group]:
        out = []
        for d in self.dialogs:
            ep = self.fmt.episode(d, t + 2)
            target = ep.output[:-1] if ep.output and ep.output[-1] == self.eos else ep.output
            out.append(Group(str(d.id), ep.chunks, [Query(ep.input, [target])]))
        return out

    def aggregate(self, groups, scores, calib):
        ll = sum(s[0][0][0] for s in scores)
        n = sum(s[0][0][1] for s in scores)
        return {"ppl": math.exp(-ll / max(n, 1)), "tokens": n}

    def describe(self):
        return {"suite": "chitchat", "dialogs": len(self.dialogs), "ts": list(self.ts), "format": self.format,
                "split": f"{_pool_name(self.source, 'test + validation', self.split_seed)}, dialogs with >= "
                         f"{max(self.ts) + 2} turns, first {len(self.dialogs)}", "eos_excluded": True,
                "dialogs_from": self.source}


class IclSuite(Suite):
    """Multiple-choice accuracy on the unseen test tasks of :mod:`ccmem.data.icl` after t demonstrations (one time
    step each), MetaICL-style: a fixed demonstration pool per task (the first t are used), ``items`` test examples.
    The metric is the mean over tasks of ``acc_norm``; ``acc`` and ``acc_base`` (calibrated by the option's
    likelihood after "Output:" alone) are reported beside it."""

    name, metric, higher_is_better = "icl", "acc_norm", True

    def __init__(self, tokenizer: Any, items: int = 100, ts: Sequence[int] = (1, 2, 4, 8, 16), tasks=None,
                 seed: int = 100):
        from ..data.icl import TEST_TASKS, IclFormat, build_tasks, split_task

        self.ts, self.items, self.seed = tuple(ts), items, seed
        self.fmt = IclFormat(tokenizer)
        all_tasks = tasks if tasks is not None else build_tasks()
        self.tasks = {n: all_tasks[n] for n in (TEST_TASKS if tasks is None else all_tasks)}
        self.splits = {n: split_task(t, k=max(self.ts), seed=seed) for n, t in self.tasks.items()}
        self.calib_input = self.fmt.ids("Output:")

    def groups(self, t: int) -> list[Group]:
        out = []
        for name, (pool, items) in self.splits.items():
            qs = [Query(self.fmt.query(e), [self.fmt.option(o) for o in e.options], e.answer)
                  for e in items[:self.items]]
            cal = [Query(self.calib_input, q.targets, q.answer) for q in qs]
            out.append(Group(name, [self.fmt.demo(e) for e in pool[:t]], qs, cal))
        return out

    def aggregate(self, groups, scores, calib):
        per_task = {}
        for gi, g in enumerate(groups):
            ll = [[s[0] for s in q] for q in scores[gi]]
            lens = [[s[1] for s in q] for q in scores[gi]]
            base = [[s[0] for s in q] for q in calib[gi]] if calib else None
            per_task[g.id] = multiple_choice(ll, lens, [q.answer for q in g.queries], base)
        keys = next(iter(per_task.values())).keys()
        out: dict[str, Any] = {k: sum(r[k] for r in per_task.values()) / len(per_task) for k in keys}
        out["per_task_acc_norm"] = {n: r["acc_norm"] for n, r in per_task.items()}
        return out

    def resample(self, groups, scores, calib, rng):
        """Items are drawn within each task (a group is one task): the metric stays a mean over the same tasks."""
        from .intervals import resample_queries

        return resample_queries(groups, scores, calib, rng)

    def describe(self):
        return {"suite": "icl", "test_tasks": list(self.tasks), "items_per_task": self.items, "ts": list(self.ts),
                "demo_pool_seed": self.seed,
                "split": "unseen test tasks of ccmem.data.icl (adapters trained on the training tasks only)"}


class RecallSuite(Suite):
    """Recall of a personal fact stated in a held-out chit-chat dialog and asked about d turns later (d = the time
    step of this suite; the context holds fact_turn + d turns). Multiple choice over four answer sentences that
    differ only in the value (:mod:`ccmem.data.recall`, held-out fact types only); metric acc_norm. ``facts=k``:
    the fact turn states k facts of distinct types and one is asked (the memory must hold all of them)."""

    name, metric, higher_is_better = "recall", "acc_norm", True

    def __init__(self, tokenizer: Any, items: int = 100, ts: Sequence[int] = (1, 2, 4, 8, 16), split_seed: int = 0,
                 fact_turn: int = 1, seed: int = 0, split: str = "test", format: str = "plain", facts: int = 1,
                 source: str = "chitchat"):
        from ..data.recall import eval_items

        self.ts, self.fact_turn, self.split, self.split_seed = tuple(ts), fact_turn, split, split_seed
        self.format, self.facts, self.source = format, facts, source
        dialogs, self.fmt = _dialog_pool(tokenizer, source, split_seed, format, [split])
        self.items = eval_items(dialogs, self.ts, items, fact_turn, seed, facts=facts)
        self._values: dict[str, str] = {}  # group id -> the fact's value (exact match), filled by groups()
        self._types: dict[str, str] = {}  # group id -> the fact's type (acc_norm per type), filled by groups()

    def steps(self, t: int) -> int:
        return self.fact_turn + t

    def groups(self, t: int) -> list[Group]:
        from ..data.recall import item_episode

        out = []
        for it in self.items[t]:
            ep = item_episode(it, self.fmt)
            out.append(Group(ep.id, ep.chunks, [Query(ep.input, list(ep.options), ep.answer)]))
            self._values[ep.id] = it.value
            self._types[ep.id] = it.fact_type
        return out

    def generate(self, method: Any, ccm: Any, groups: list[Group], budget: Budget, max_new_tokens: int = 12
                 ) -> list[bool]:
        """Exact match: greedy reply from the method's memory (its online session); a hit when the reply contains
        the fact's value."""
        tok = self.fmt.tok
        stop = [t for t in (tok.eos_token_id, *tok("\n", add_special_tokens=False)["input_ids"]) if t is not None]
        hits = []
        for g, b in zip(groups, per_unit(budget, len(groups))):
            s = method.session(ccm, g.chunks, b)
            out = s.generate(g.queries[0].input, max_new_tokens=max_new_tokens, eos_token_id=stop)
            hits.append(self._values[g.id].lower() in tok.decode(out).lower())
        return hits

    def aggregate(self, groups, scores, calib):
        ll = [[s[0] for s in g[0]] for g in scores]
        lens = [[s[1] for s in g[0]] for g in scores]
        res = multiple_choice(ll, lens, [g.queries[0].answer for g in groups])
        res.pop("acc_base", None)
        for kind in sorted({self._types[g.id] for g in groups if g.id in self._types}):
            idx = [i for i, g in enumerate(groups) if self._types.get(g.id) == kind]
            res[f"acc_norm_{kind}"] = multiple_choice([ll[i] for i in idx], [lens[i] for i in idx],
                                                      [groups[i].queries[0].answer for i in idx])["acc_norm"]
        return res

    def describe(self):
        from ..data.recall import describe

        return {"suite": "recall", "items": len(self.items[self.ts[0]]), "ts": list(self.ts), "format": self.format,
                "fact_turn": self.fact_turn, "facts_per_turn": self.facts,
                "split": _pool_name(self.source, f"{self.split} split", self.split_seed), "dialogs_from": self.source,
                "distance": "t = turns between the fact and the question", **describe()}
