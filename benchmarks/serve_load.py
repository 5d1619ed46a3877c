"""Server load (issue 14): concurrent chat sessions against ``ccmem serve`` on loopback, ccmem memory vs the same
server keeping full history (every message's raw keys/values), on the real default model and the adapter ``ccmem
serve`` loads by default (``ccmem.demo.chat_adapter``; ``--adapter`` for another).

Each session is a real chit-chat dialog (test split): its user turns are sent one request at a time (only the new
message, with ``X-Session-Id``), the server answers (greedy, ``--max-tokens``) and keeps the turn. Measured per turn
index: p50 / p95 latency (queueing included: one model serves every session), KV bytes the session holds after the
turn, and the server process's RSS; overall turns per second. Bounded: ``--time-limit`` seconds per server.

    python benchmarks/serve_load.py                               # 32 sessions x 12 turns, both servers
    python benchmarks/serve_load.py --sessions 4 --turns 3        # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, environment, markdown_table  # noqa: E402

MODES = ("ccmem", "full_history")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def user_turns(sessions: int, turns: int) -> list[list[str]]:
    from ccmem.models import load_tokenizer
    from ccmem.recipe import chitchat_splits

    splits, _, _ = chitchat_splits(load_tokenizer("smollm2"), {"split_seed": 0, "max_turn_tokens": 128})
    dialogs = [d for d in splits["test"] if len(d.turns) >= 2 * turns][:sessions]
    if len(dialogs) < sessions:
        raise SystemExit(f"only {len(dialogs)} test dialogs have {2 * turns} turns")
    return [[d.turns[2 * i] for i in range(turns)] for d in dialogs]


def run_mode(mode: str, convos: list[list[str]], max_tokens: int, time_limit: float, adapter: str) -> dict[str, Any]:
    from ccmem.model import CompressedModel
    from ccmem.models import load_model
    from ccmem.server import Engine, ServerConfig, create_app
    from ccmem.server.engine import Limits
    from ccmem.server.main import ThreadedServer
    from ccmem.server.store import SessionStore

    model, tok = load_model("smollm2")
    ccm = CompressedModel.from_pretrained(adapter, model, tokenizer=tok)
    tmp = tempfile.TemporaryDirectory()
    engine = Engine(ccm, SessionStore(tmp.name), Limits(max_queue=len(convos) + 4, max_new_tokens=max_tokens),
                    full_history=mode == "full_history")
    server = ThreadedServer(create_app(engine, ServerConfig(api_keys={"bench"})))
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + time_limit

    def talk(i: int, turns: list[str]) -> None:
        for k, text in enumerate(turns, 1):
            if time.perf_counter() > deadline:
                return
            body = json.dumps({"model": "ccmem", "messages": [{"role": "user", "content": text}],
                               "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Authorization": "Bearer bench", "X-Session-Id": f"s{i}",
                                                  "Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
            dt = time.perf_counter() - t0
            with lock:
                records.append({"session": i, "turn": k, "latency_s": dt, "kv_bytes": out["ccmem"]["session"]["bytes"],
                                "slots": out["ccmem"]["session"]["slots"], "rss": rss_bytes(),
                                "completion_tokens": out["usage"]["completion_tokens"]})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=talk, args=(i, c)) for i, c in enumerate(convos)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server.stop()
    engine.store.close()
    tmp.cleanup()
    return {"mode": mode, "wall_s": wall, "turns_done": len(records), "turns_per_s": len(records) / wall,
            "records": records}


def per_turn(run: dict[str, Any], turns: int) -> list[dict[str, Any]]:
    rows = []
    for k in range(1, turns + 1):
        rs = [r for r in run["records"] if r["turn"] == k]
        if not rs:
            continue
        lat = sorted(r["latency_s"] for r in rs)
        rows.append({"mode": run["mode"], "turn": k, "sessions": len(rs), "p50_s": statistics.median(lat),
                     "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                     "kv_kib_per_session": sum(r["kv_bytes"] for r in rs) / len(rs) / 1024,
                     "slots_per_session": sum(r["slots"] for r in rs) / len(rs),
                     "rss_mib": max(r["rss"] for r in rs) / 2**20})
    return rows


def report(res: dict[str, Any], name: str) -> None:
    rows = [r for run in res["runs"] for r in per_turn(run, res["config"]["turns"])]
    last = res["config"]["turns"]
    by = {(r["mode"], r["turn"]): r for r in rows}
    ratio = None
    if ("ccmem", last) in by and ("full_history", last) in by:
        ratio = by[("full_history", last)]["kv_kib_per_session"] / by[("ccmem", last)]["kv_kib_per_session"]
    tps = {run["mode"]: run["turns_per_s"] for run in res["runs"]}
    res["headline"] = {
        "metric": f"kv_bytes_per_session_full_over_ccmem_at_turn_{last}", "value": ratio, "target": 8.0,
        "higher_is_better": True, "unit": "x",
        "throughput_ratio_ccmem_over_full": tps.get("ccmem", 0) / tps["full_history"] if tps.get("full_history")
        else None,
        "meaning": f"KV bytes a full-history server holds per session after turn {last}, divided by ccmem's; "
                   "the throughput ratio (turns/s, ccmem over full history) must be at least 1"}
    res["per_turn"] = rows
    (RESULTS / f"{name}.json").write_text(json.dumps({k: v for k, v in res.items()}, indent=2) + "\n")
    h = res["headline"]
    md = [f"# Server load: ccmem memory vs full history ({res['config']['sessions']} sessions x {last} turns)", "",
          f"Headline: **{h['metric']} = {h['value']}** (target >= {h['target']}); throughput ratio ccmem / full "
          f"history = {h['throughput_ratio_ccmem_over_full']} (target >= 1).", "",
          f"Command: `{res['command']}`", "",
          "One model serves every session: one engine worker runs up to 8 waiting sessions per batched step, so "
          "latency includes queueing behind the other sessions. A turn = the user message read and kept, a greedy "
          "reply of at most "
          f"{res['config']['max_tokens']} tokens, the reply kept, the session saved to disk. Adapter: "
          f"`{res['config'].get('adapter', 'adapters/chitchat-concat')}`.", "",
          markdown_table([{"mode": r["mode"], "turns_done": r["turns_done"], "wall_s": r["wall_s"],
                           "turns_per_s": r["turns_per_s"]} for r in res["runs"]],
                         ["mode", "turns_done", "wall_s", "turns_per_s"]), "",
          "## Per turn", "", markdown_table(rows, list(rows[0]) if rows else ["mode"]), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    plot(rows, name)


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for mode, color in zip(MODES, ("tab:blue", "tab:red")):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        t = [r["turn"] for r in rs]
        axes[0].plot(t, [r["kv_kib_per_session"] for r in rs], "o-", color=color, label=mode)
        axes[1].plot(t, [r["p50_s"] for r in rs], "o-", color=color, label=f"{mode} p50")
        axes[1].plot(t, [r["p95_s"] for r in rs], "o--", color=color, label=f"{mode} p95")
        axes[2].plot(t, [r["rss_mib"] for r in rs], "o-", color=color, label=mode)
    for a, y in zip(axes, ("KV KiB per session", "latency per turn (s)", "server RSS (MiB)")):
        a.set(xlabel="turn", ylabel=y)
        a.legend(fontsize=8)
    fig.suptitle("ccmem serve: compressed memory vs full history")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=1800, help="seconds per server")
    ap.add_argument("--name", default="serve_load")
    ap.add_argument("--adapter", default=None, help="adapter folder (default: what `ccmem serve` loads)")
    ap.add_argument("--report", action="store_true", help="only re-render the table and plot from the JSON")
    args = ap.parse_args()
    if args.report:
        report(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return
    if args.adapter is None:
        from ccmem.demo import chat_adapter

        a = chat_adapter("concat").resolve()
        args.adapter = str(a.relative_to(Path.cwd()) if a.is_relative_to(Path.cwd()) else a)
    from ccmem.config import CompressionConfig
    from ccmem.errors import ConfigError
    from ccmem.model import CompressedModel
    from ccmem.session import require_online

    c = CompressionConfig.from_dict(CompressedModel.read_adapter(args.adapter)[1]["compression"])
    try:  # before the ccmem half runs: the session refuses a gist adapter, the full-history server a merge or tail
        require_online(c, args.adapter)
    except ConfigError as e:
        ap.error(str(e))
    if c.merging or c.raw_tail:
        ap.error(f"--adapter {args.adapter} is a {c.variant} adapter" + (f" with a raw tail of {c.raw_tail}"
                 if c.raw_tail else "") + "; the full-history server it is compared with serves the same model "
                 "without compressing, which needs a concat adapter without a raw tail")
    convos = user_turns(args.sessions, args.turns)
    runs = [run_mode(m, convos, args.max_tokens, args.time_limit, args.adapter) for m in MODES]
    res = {"name": args.name, "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
           "environment": environment(), "config": {k: v for k, v in vars(args).items() if k != "report"},
           "runs": runs}
    report(res, args.name)
    print(json.dumps(res["headline"], indent=2))


if __name__ == "__main__":
    main()
