"""``ccmem demo``: replay held-out chit-chat conversations turn by turn with the adapters ``ccmem chat`` loads.

For every turn it shows what was compressed into how many slots, the memory's KV bytes against full context, the
perplexity of the real next turn under full context, CCM-concat, CCM-merge, a sliding window holding CCM-concat's KV
and no context, and a reply generated from the compressed memory; it ends with a summary table and a PNG plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .data.episode import Episode


def adapters_dir() -> Path:
    """Where the shipped adapters live: ``$CCMEM_ADAPTERS``, else the ``adapters/`` folder of the source checkout
    this package runs from (an editable install, as ``make setup`` makes)."""
    import os

    env = os.environ.get("CCMEM_ADAPTERS")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        if (parent / "adapters" / "chitchat-concat" / "adapter.safetensors").is_file():
            return parent / "adapters"
    raise FileNotFoundError(
        "the shipped adapters were not found: set CCMEM_ADAPTERS to a folder holding chitchat-concat/ and "
        "chitchat-merge/ (the repository's adapters/), or pass --adapter PATH"
    )


def default_adapter(variant: str) -> Path:
    """The shipped chit-chat adapter of a variant (trained on plain ``A: / B:`` dialog lines): the fallback of
    :func:`chat_adapter` where no general adapter is present."""
    return adapters_dir() / f"chitchat-{variant}"


# The general adapters, trained in the chat template, newest first: the first one present is what ``ccmem chat`` and
# ``ccmem serve`` load for concat (README, "Shipped adapters": general-chat-decay, the long run's cool-down branch, is
# ahead of general-chat on The Office and level with it or better on the other suites).
GENERAL_CHAT = ("general-chat-decay", "general-chat")
# ... and for merge: the merge branch of general-chat-decay (configs/general_merge_decay.yaml)
GENERAL_MERGE = ("general-merge-decay",)


def chat_adapter(variant: str = "concat") -> Path:
    """What ``ccmem chat`` and ``ccmem serve`` load by default: the newest general adapter of the variant
    (:data:`GENERAL_CHAT`, :data:`GENERAL_MERGE`), trained in the chat template they render, where one exists; the
    chit-chat adapter (plain ``A: / B:`` lines) otherwise."""
    for name in {"concat": GENERAL_CHAT, "merge": GENERAL_MERGE}.get(variant, ()):
        if (adapters_dir() / name / "adapter.safetensors").is_file():
            return adapters_dir() / name
    return default_adapter(variant)


CHAT_RAW_TAIL = 1


def chat_raw_tail(adapter: str | Path) -> int | None:
    """The raw tail ``ccmem chat`` reads an adapter with when none is asked for: the newest turn verbatim for the
    shipped general adapters (general-chat, trained without a tail, is ahead of itself read without one at every t
    on its own chit-chat test dialogs, The Office and Shakespeare: README, "Evaluation"; its cool-down branch is
    measured as it is read, with this tail; the merge branch read with it is ahead of itself without it on the same
    200 test dialogs, `chitchat_quality_general_merge_tail1_paired`), the adapter's own for any other. A shipped
    adapter is known by its folder, or by its weights and compression config in another folder (a copy, a training
    checkpoint), so the same adapter is read the same way wherever it is given from."""
    try:
        general = [(adapters_dir() / name).resolve() for name in GENERAL_CHAT + GENERAL_MERGE]
    except FileNotFoundError:  # an install without the shipped adapters: the adapter given is read as saved
        return None
    if Path(adapter).resolve() in general:
        return CHAT_RAW_TAIL
    mine = _identity(Path(adapter))
    if mine is not None and mine in {_identity(g) for g in general}:
        return CHAT_RAW_TAIL
    return None


def _identity(folder: Path) -> tuple[str, str] | None:
    """An adapter folder's (sha256 of its tensors, compression config) as its file's header records them; None where
    there is no readable header (loading such a file gives the error that names the problem)."""
    from .io import read_header

    found = read_header(folder / "adapter.safetensors")
    if found is None or not isinstance(found[1].get("compression"), dict):
        return None
    return found[0], json.dumps(found[1]["compression"], sort_keys=True)


def stop_ids(tok: Any) -> list[int]:
    """Generation stops at the end of a line (one turn) or at the end-of-text token."""
    ids = {tok.eos_token_id}
    for s in ("\n", " \n", ".\n"):
        enc = tok(s, add_special_tokens=False)["input_ids"]
        if enc and tok.decode(enc[-1:]).endswith("\n"):
            ids.add(enc[-1])
    return [i for i in ids if i is not None]


def run_demo(conversations: int = 3, turns: int = 10, out: str | Path = "demo_output", device: str | None = None,
             max_new_tokens: int = 24, model: str = "smollm2", adapters: dict[str, str | Path] | None = None
             ) -> list[dict]:
    """Replay ``conversations`` held-out dialogs for ``turns`` turns; ``model``/``adapters`` default to the
    embedded SmolLM2 and the adapters ``ccmem chat`` loads (:func:`chat_adapter`), read as it reads them: in the
    dialog format they were trained on and with their raw tail (:func:`chat_raw_tail`). The sliding window beside
    them holds as many of the newest context tokens as CCM-concat holds slots and raw tokens: the same KV."""
    import torch

    from .memory import bytes_per_slot
    from .model import CompressedModel
    from .models import load_model
    from .recipe import adapter_dialog_format, chitchat_splits
    from .scoring import perplexity

    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {v: (adapters or {}).get(v) or chat_adapter(v) for v in ("concat", "merge")}
    models = {}
    for v, path in paths.items():
        m, tok = load_model(model, device=device)
        models[v] = CompressedModel.from_pretrained(path, m, tokenizer=tok, raw_tail=chat_raw_tail(path))
    tok = models["concat"].tokenizer
    form = (adapter_dialog_format(paths["concat"]) if Path(paths["concat"]).is_dir() else None) or "plain"
    splits, fmt, _ = chitchat_splits(tok, {"split_seed": 0, "max_turn_tokens": 128, "format": form})
    dialogs = [d for d in splits["test"] if len(d.turns) >= turns + 1][:conversations]
    names = {v: Path(str(p)).name + (f", raw tail {models[v].config.raw_tail}" if models[v].config.raw_tail else "")
             for v, p in paths.items()}
    print(f"CCM-concat: {names['concat']}; CCM-merge: {names['merge']}; turns as {form} text")
    per_slot = bytes_per_slot(models["concat"].model)
    stops = stop_ids(tok)
    rows: list[dict] = []
    eos = tok.eos_token_id
    for ci, d in enumerate(dialogs):
        print(f"\n=== held-out conversation {ci + 1}/{len(dialogs)} ({d.id[:8]}, {len(d.turns)} turns) ===")
        sessions = {v: models[v].session() for v in models}
        full_tokens = 0
        for k in range(2, turns + 1):  # target turn k (1-based), input turn k-1, turns 1..k-2 in the context
            i = k - 2  # index of the turn that joins the memory before this prediction
            mem_line = ""
            if i >= 1:
                chunk = fmt.turn(i - 1, d.turns[i - 1])
                for s in sessions.values():
                    s.add_context(chunk)
                full_tokens += len(chunk)
            held = {v: _held(s.memory) for v, s in sessions.items()}  # (slots, raw tail tokens)
            if i >= 1:
                mem_line = (f"memory: turn {i} ({len(chunk)} tokens) joined | " + " | ".join(
                    f"CCM-{v} {n} slots" + (f" + {raw} raw" if raw else "")
                    + f" ({(n + raw) * per_slot / 1024:.0f} KiB)" for v, (n, raw) in held.items())
                    + f" | full context {full_tokens} tokens ({full_tokens * per_slot / 1024:.0f} KiB)")
            ep = fmt.episode(d, k)
            prompt, target = ep.input, ep.output[:-1] if ep.output[-1] == eos else ep.output
            row = {"conversation": ci + 1, "turn": k, "compressed_turns": len(ep.chunks),
                   "full_kib": full_tokens * per_slot / 1024,
                   **{f"{v}_kib": sum(held[v]) * per_slot / 1024 for v in sessions}}
            one = [Episode(ep.chunks, ep.input, list(target))]
            row["full_ppl"] = perplexity(models["concat"], one, "full").ppl
            row["none_ppl"] = perplexity(models["concat"], one, "none").ppl
            kept = _window(ep.chunks, sum(held["concat"]))
            row["window_ppl"] = perplexity(models["concat"], [Episode([kept] if kept else [], ep.input, list(target))],
                                           "full").ppl
            for v, s in sessions.items():
                sc = s.score(prompt, target)
                row[f"{v}_ppl"] = math.exp(float(sc.nll.sum()) / int(sc.ntokens.sum()))
            reply = sessions["concat"].generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                                 repetition_penalty=1.3)
            row["reply"] = tok.decode(reply, skip_special_tokens=True).strip()
            row["real"] = d.turns[k - 1]
            rows.append(row)
            print(f"turn {k:2d} | input: {d.turns[k - 2][:70]!r}")
            if mem_line:
                print(f"        | {mem_line}")
            print(f"        | real next turn: {d.turns[k - 1][:70]!r}")
            print(f"        | ppl of the real turn: full {row['full_ppl']:.1f}  CCM-concat {row['concat_ppl']:.1f}  "
                  f"CCM-merge {row['merge_ppl']:.1f}  window (concat's KV) {row['window_ppl']:.1f}  "
                  f"no context {row['none_ppl']:.1f}")
            print(f"        | CCM-concat reply: {row['reply'][:90]!r}")
    _summary(rows, out)
    return rows


def _window(chunks: list[list[int]], budget: int) -> list[int]:
    """The newest ``budget`` context tokens (all of them when the budget is larger): a sliding window's KV."""
    ctx = [t for c in chunks for t in c]
    return ctx[max(0, len(ctx) - budget):] if budget > 0 else []


def _held(memory: Any) -> tuple[int, int]:
    """(compressed slots, raw tail tokens) of a one-row memory: what it holds for the context, in KV slots."""
    return memory.num_slots, sum(memory.tail_tokens())


def _summary(rows: list[dict], out: Path) -> None:
    import json

    by_t: dict[int, list[dict]] = {}
    for r in rows:
        by_t.setdefault(r["compressed_turns"], []).append(r)
    keys = ("full_ppl", "concat_ppl", "merge_ppl", "window_ppl", "none_ppl", "full_kib", "concat_kib", "merge_kib")
    table = ["| context turns | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    summary = []
    for t in sorted(by_t):
        rs = by_t[t]
        # perplexities: geometric mean over conversations; memory: mean
        vals = {k: (math.exp(sum(math.log(r[k]) for r in rs) / len(rs)) if k.endswith("ppl")
                    else sum(r[k] for r in rs) / len(rs)) for k in keys}
        summary.append({"compressed_turns": t, **vals})
        table.append(f"| {t} | " + " | ".join(f"{vals[k]:.1f}" for k in keys) + " |")
    text = "\n".join(table) + "\n"
    print("\nSummary (perplexity of the real next turn, geometric mean over conversations; KV memory in KiB)\n")
    print(text)
    (out / "summary.md").write_text(text)
    (out / "turns.json").write_text(json.dumps(rows, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s["compressed_turns"] for s in summary]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k, label in (("full_ppl", "full context"), ("concat_ppl", "CCM-concat"), ("merge_ppl", "CCM-merge"),
                     ("window_ppl", "sliding window, CCM-concat's KV"), ("none_ppl", "no context")):
        a.plot(ts, [s[k] for s in summary], marker="o", label=label)
    a.set(xlabel="context turns (the newest kept raw with a tail)", ylabel="perplexity of the next turn",
          title="quality")
    for k, label in (("full_kib", "full context"), ("concat_kib", "CCM-concat"), ("merge_kib", "CCM-merge")):
        b.plot(ts, [s[k] for s in summary], marker="o", label=label)
    b.set(xlabel="context turns", ylabel="KV memory for the context (KiB)", title="memory")
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    print(f"plot: {out / 'demo.png'}, table: {out / 'summary.md'}")
