"""Where ccmem stands, at a glance: one row per committed `ccmem eval` result (equal-KV runs and frontiers), read from
benchmarks/results/*.json, with the trained method's margin over the best competitor at most its KV, its 95 % paired
interval, a verdict (ahead: the interval is above 0; level: it spans 0; behind: below 0), the competitors that were in
the run (a margin against training-free methods only is a weaker claim than one against kvpress presses) and, where
the run had `--control`, what the right context's memory is worth apart from the adapter's prior.

Nothing is rerun: the rows are the committed files' own numbers, so the table is only as current as they are (each row
names the git revision its run came from). Writes benchmarks/results/scoreboard.{json,md}. Headline: how many results
have CCM ahead with an interval clear of 0 (target: all of them, the issue's "headlines above 0").
Run: python benchmarks/scoreboard.py [--name scoreboard]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, markdown_table, write_results  # noqa: E402


def verdict(value: float, ci: list[float] | None) -> str:
    """ahead / level / behind by the interval (by the sign alone where a result has no interval)."""
    lo, hi = ci if ci else (value, value)
    return "ahead" if lo > 0 else "behind" if hi < 0 else "level"


def _competitors(cfg: dict[str, Any], rivals: list[str] | None = None) -> str:
    """Every method the headline's CCM-concat was compared with. A run that lists them (``rivals``, written by
    `ccmem eval` since CCM-merge stopped being one) says it; an older run compared with the training-free methods,
    the presses and the trained rivals in the run (CCM-merge, Gisting, non-recurrent) whose peer it is; a name
    starting with ccm_concat is a CCM-concat itself, and a rival with another peer (``gist_cpu`` against
    ``ccm_concat_cpu``) is that one's."""
    if rivals is not None:
        return ", ".join(r.replace("kvpress_", "kvpress ") for r in rivals if r != "none") or "references only"
    tf = list(cfg.get("training_free") or [])
    presses = [f"kvpress {p}" for p in cfg.get("presses") or []]
    peers = cfg.get("peers") or {}
    rivals = [n for n in cfg.get("adapters") or {}
              if not n.startswith("ccm_concat") and peers.get(n, "ccm_concat") == "ccm_concat"]
    return ", ".join(tf + presses + rivals) or "references only"


def _adapter(cfg: dict[str, Any]) -> str:
    """The method the headline is about (ccm_concat when the run has one), with its raw tail if it was read with one."""
    adapters = cfg.get("adapters") or {}
    name = "ccm_concat" if "ccm_concat" in adapters else next(iter(adapters), "")
    tail = (cfg.get("raw_tails") or {}).get(name)
    return f"{adapters.get(name, '?')}" + (f" (raw tail {tail})" if tail else "")


def _memory_value(report: dict[str, Any], worst_t: int | None) -> str:
    """The control's margin (ppl or accuracy the right memory adds over another unit's) at the headline's t."""
    rows = [r for r in report.get("context_value") or [] if r.get("ccm") == "ccm_concat"]
    if not rows and report.get("points"):  # a frontier keeps its control as a point of its own (no paired interval)
        metric, sign = report.get("metric", "ppl"), 1 if report.get("higher_is_better") else -1
        pts = {(p["t"], p["method"]): p[metric] for p in report["points"] if metric in p}
        rows = [{"t": t, "margin": sign * (v - pts[(t, "ccm_concat_other")])}
                for (t, m), v in sorted(pts.items()) if m == "ccm_concat" and (t, "ccm_concat_other") in pts]
    row = next((r for r in rows if r.get("t") == worst_t), rows[-1] if rows else None)
    if row is None:
        return ""
    lo, hi = row["margin_ci"] if row.get("margin_ci") else (None, None)
    span = f" [{lo:.3g}, {hi:.3g}]" if lo is not None else ""
    return f"{row['margin']:.3g}{span} (t = {row['t']})"


def _data(dialogs: str | None) -> str:
    """Where a run's dialogs came from: its adapter's own split, a domain held out of all training, or the held-out
    plays / episodes of a script source (``<source>:test``) whose other plays a recipe may have trained on."""
    if dialogs in (None, "chitchat"):
        return "own split"
    if dialogs.endswith(":test"):
        return f"held-out works: {dialogs}"
    return f"held out: {dialogs}"


def row_of(path: Path) -> dict[str, Any] | None:
    """A scoreboard row from one result file, or None for a file that is not a `ccmem eval` margin result."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable result file ({e}); rerun the command that wrote it") from e
    if not isinstance(report, dict):
        return None
    cfg, head = report.get("config") or {}, report.get("headline") or {}
    if "suite" not in cfg or "margin" not in str(head.get("metric", "")) or head.get("value") is None:
        return None
    competitors = _competitors(cfg, report.get("rivals"))
    if competitors == "references only":
        return None  # references only (a checkpoint's check): its margin is over no context, not over a competitor
    ci, value = head.get("interval_95"), float(head["value"])
    # the headline is the worst of the per-t margins the report keeps: its row names the t and the competitor
    rows = [r for r in report.get("margins") or [] if r.get("ccm") == "ccm_concat"]
    worst = min(rows, key=lambda r: abs(r["margin"] - value)) if rows else {}
    return {
        "name": report.get("name", path.stem),
        "suite": cfg["suite"],
        "data": _data(cfg.get("dialogs_from")),
        "kind": "frontier" if report.get("per_step") is not None else "equal KV",
        "adapter": _adapter(cfg),
        "competitors": competitors,
        "ts": cfg.get("ts"),
        "metric": head.get("unit", ""),
        "margin": round(value, 4),
        "interval_95": ci,
        "verdict": verdict(value, ci),
        "worst_t": worst.get("t"),
        "worst_against": worst.get("best_other", ""),
        "memory_value": _memory_value(report, worst.get("t")),
        "git_rev": (report.get("environment") or {}).get("git_rev", ""),
    }


def scoreboard(results: Path) -> list[dict[str, Any]]:
    rows = [r for p in sorted(results.glob("*.json")) if (r := row_of(p)) is not None]
    if not rows:
        raise SystemExit(f"no `ccmem eval` results with a margin headline under {results}: run `ccmem eval` first")
    return sorted(rows, key=lambda r: (r["suite"], r["data"], r["name"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="scoreboard")
    args = ap.parse_args()
    rows = scoreboard(RESULTS)
    ahead = sum(r["verdict"] == "ahead" for r in rows)
    headline = {"metric": "results_ahead", "value": ahead, "target": len(rows), "higher_is_better": True,
                "unit": "results",
                "meaning": f"of the {len(rows)} committed `ccmem eval` results, how many have the trained method ahead "
                           "of the best competitor at most its KV with a 95 % interval above 0"}
    cols = ["name", "suite", "data", "kind", "adapter", "competitors", "metric", "margin", "interval_95", "verdict",
            "worst_t", "worst_against", "memory_value", "git_rev"]
    table = (f"# Scoreboard: every committed `ccmem eval` margin\n\n"
             f"Headline: **{ahead} of {len(rows)}** results have CCM ahead with an interval above 0. "
             "Margin: the trained method's worst margin over t against the best competitor holding at most its KV "
             "(positive = CCM better; ppl margins are other - CCM, accuracy margins CCM - other). `memory_value`: "
             "what the right unit's memory adds over another unit's (the `--control` run; a frontier's has no "
             "interval), at the headline's t. "
             "Each row is as current as its run (`git_rev`); rerun a row with the `command` in its file.\n\n"
             + markdown_table(rows, cols) + "\n")
    cmd = "python benchmarks/scoreboard.py" + (f" --name {args.name}" if args.name != "scoreboard" else "")
    path = write_results(args.name, cmd, headline, {"results": str(RESULTS.relative_to(RESULTS.parents[1]))}, rows,
                         table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
