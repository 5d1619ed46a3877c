"""``ccmem`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .data.scripts import DIALOG_CHOICES
from .errors import CCMError


def _demo_tiny(args: argparse.Namespace) -> int:
    """Online compression on a tiny random Llama: shows the memory staying small while turns accumulate."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import CompressionConfig
    from .model import CompressedModel

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for variant in ("concat_recur", "merge_recur"):
        ccm = CompressedModel.attach(model, CompressionConfig(variant=variant, n_tok=2))
        s = ccm.session()
        g = torch.Generator().manual_seed(1)
        print(f"== {variant} (n_tok=2) on a tiny random Llama ==")
        full = 0
        for t in range(1, args.turns + 1):
            turn = torch.randint(3, 256, (int(torch.randint(10, 30, (1,), generator=g)),), generator=g).tolist()
            rep = s.add_context(turn)
            full += len(turn)
            print(f"turn {t:2d}: compress {rep.tokens[0]:2d} -> {ccm.config.n_tok} tokens "
                  f"(memory key/value size = {rep.slots[0]}, {rep.memory_bytes / 1024:.1f} KiB; "
                  f"full context would hold {full} tokens)")
        reply = s.generate([5, 6, 7], max_new_tokens=8, eos_token_id=None)
        print(f"reply from memory (greedy, untrained): {reply}\n")
        ccm.detach(remove_weights=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.tiny:
        return _demo_tiny(args)
    from .demo import run_demo

    run_demo(conversations=args.conversations, turns=args.turns, out=args.out, device=args.device)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(args.variant, args.adapter, args.device, template=not args.plain, raw_tail=args.raw_tail)


def _serve(args: argparse.Namespace) -> int:
    from .server.main import run

    return run(args)


def _stream(args: argparse.Namespace) -> int:
    from .streaming import StreamConfig, run_stream

    cfg = StreamConfig(window=args.window, chunk=args.chunk, mem_slots=args.mem_slots, sink=1)
    res = run_stream(args.adapter, args.text, args.tokens, args.start, cfg, args.device)
    print(f"{res['tokens']} tokens of {args.text}; cache budget {cfg.window} slots "
          f"({cfg.window * res['bytes_per_slot'] / 1024:.0f} KiB), identical for every method at every token")
    print("| method | perplexity | tokens/s | max cache slots |")
    print("|---|---|---|---|")
    for name, r in res["runs"].items():
        print(f"| {name} | {r.ppl:.3f} | {len(r.nll) / r.seconds:.0f} | {max(r.cache_sizes)} |")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, run_recipe

    cfg = load_recipe(args.config, args.overrides)
    out = run_recipe(cfg, device=args.device)
    print(f"[ccmem] adapter written to {out}")
    return 0


def _train_curve(args: argparse.Namespace) -> int:
    from . import train_log

    rows = train_log.read_log(args.run)
    wins = train_log.windows(rows, args.window or train_log.default_window(len(rows)))
    print(train_log.table(wins), end="")
    src = Path(args.run)
    out = Path(args.output) if args.output else (src if src.is_dir() else src.parent) / "train_curve.png"
    train_log.plot(wins, out, title=f"{src.name}: training loss per {wins[0]['steps']} steps")
    print(f"[ccmem] plot written to {out}")
    return 0


def _data_export(args: argparse.Namespace) -> int:
    from .recipe import export_data, load_recipe

    cfg = load_recipe(args.config, args.overrides)
    out = export_data(cfg, args.output, args.epochs)
    print(f"[ccmem] wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.epochs} epochs); train from it with "
          f"data.source=episodes data.path={out}")
    return 0


def turn_count(v: str) -> int:
    """argparse type of `--raw-tail`: a number of turns >= 0 (shared by `ccmem chat` and `ccmem serve`)."""
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"{v!r}: give a number of turns >= 0")
    return int(v)


def _eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import run_named

    adapters = None
    if args.adapter:
        adapters = {}
        for a in args.adapter:
            if "=" not in a:
                raise SystemExit(f"--adapter {a!r} must look like NAME=PATH (e.g. ccm_concat=adapters/icl-concat)")
            k, v = a.split("=", 1)
            adapters[k] = v
    tails = {}
    for a in args.raw_tail or []:
        k, _, v = a.partition("=")
        if not k or not v.isdigit():
            raise SystemExit(f"--raw-tail {a!r} must look like NAME=K, K >= 0 chunks kept raw "
                             "(e.g. ccm_concat_tail1=1 beside --adapter ccm_concat_tail1=adapters/general-chat)")
        tails[k] = int(v)
    kw = {"presses": tuple(p for p in args.presses.split(",") if p),
          "training_free": tuple(p for p in args.training_free.split(",") if p),
          "mode": args.mode, "check": args.check, "batch_size": args.batch_size, "device": args.device,
          "control": args.control, "generate": not args.no_generate, "raw_tails": tails}
    if args.score_cache:
        from .models import cache_dir

        kw["score_cache"] = str(cache_dir() / "eval-scores") if args.score_cache is True else args.score_cache
    if args.base_adapter is not None:
        kw["base_adapter"] = None if args.base_adapter.lower() == "none" else args.base_adapter
    res, paths = run_named(args.suite, args.out, args.name, adapters, args.limit,
                           [int(t) for t in args.ts.split(",")] if args.ts else None, frontier=args.frontier,
                           format=args.format, facts=args.facts, dialogs=args.dialogs, **kw)
    print(paths[1].read_text())
    print(f"[ccmem] wrote {', '.join(map(str, paths))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ccmem", description="compressed context memory for online LM interaction")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="replay conversations turn by turn with compressed memory")
    d.add_argument("--tiny", action="store_true", help="use a tiny random model (no download, seconds)")
    d.add_argument("--turns", type=int, default=10, help="replay this many turns per conversation")
    d.add_argument("--conversations", type=int, default=3)
    d.add_argument("--out", default="demo_output", help="folder for the summary table and plot")
    d.add_argument("--device", default=None)
    d.set_defaults(fn=_demo)
    c = sub.add_parser("chat", help="interactive chat with compressed memory (default model and adapter)")
    c.add_argument("--variant", default="concat", choices=["concat", "merge"],
                   help="which default adapter (ccmem.demo.chat_adapter); with --adapter, that adapter's own")
    c.add_argument("--adapter", default=None, help="adapter folder or hub id (default: the shipped one)")
    c.add_argument("--device", default=None)
    c.add_argument("--raw-tail", type=turn_count, default=None,
                   help="keep the newest K turns raw (verbatim key/values) and compress a turn when it leaves them "
                        "(default: 1 for the shipped general adapters, ccmem.demo.GENERAL_CHAT and GENERAL_MERGE; "
                        "each was measured ahead of reading it without one; "
                        "the adapter's own for any other; 0: compress every turn)")
    c.add_argument("--plain", action="store_true",
                   help="render turns as 'A: ... / B: ...' lines instead of the tokenizer's chat template")
    c.set_defaults(fn=_chat)
    sv = sub.add_parser("serve", help="OpenAI-compatible chat server whose sessions keep compressed memory")
    from .server.main import add_arguments

    add_arguments(sv)
    sv.set_defaults(fn=_serve)
    st = sub.add_parser("stream", help="perplexity over a long text in a bounded cache: CCM vs StreamingLLM")
    st.add_argument("--adapter", default="adapters/stream-general",
                    help="a streaming adapter; the default saw neither KJV nor Bierce and beats StreamingLLM on both "
                    "(benchmarks/results/stream_domains.md); adapters/stream-kjv is the in-domain KJV one")
    st.add_argument("--text", default="kjv:new",
                    help="a text name (kjv:all|old|new, devil, pydocs, chitchat:SPLIT, fortunes) or a PG-19 .txt "
                    "file or folder")
    st.add_argument("--tokens", type=int, default=16000)
    st.add_argument("--start", type=int, default=9000)
    st.add_argument("--window", type=int, default=160)
    st.add_argument("--chunk", type=int, default=64)
    st.add_argument("--mem-slots", type=int, default=8)
    st.add_argument("--device", default=None)
    st.set_defaults(fn=_stream)
    t = sub.add_parser("train", help="train an adapter from a YAML recipe (configs/*.yaml) plus key=value overrides")
    t.add_argument("config", nargs="?", help="recipe YAML")
    t.add_argument("overrides", nargs="*", help="e.g. train.max_steps=100 compression.n_tok=4")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.set_defaults(fn=_train)
    tc = sub.add_parser("train-curve", help="a run's training loss per window of steps, overall and per part of its "
                                            "data mix: a table and a plot (works while the run goes on)")
    tc.add_argument("run", help="run folder (train.output_dir), adapter folder or train_log.jsonl")
    tc.add_argument("-o", "--output", default=None, help="PNG to write (default: train_curve.png beside the log)")
    tc.add_argument("--window", type=int, default=0, help="steps per window (default: about 20 windows, >= 10 steps)")
    tc.set_defaults(fn=_train_curve)
    da = sub.add_parser("data", help="training data as one file: `ccmem data export RECIPE -o FILE`")
    da_sub = da.add_subparsers(dest="data_cmd", required=True)
    dx = da_sub.add_parser("export", help="write a recipe's training episodes (N epochs) and validation episodes to "
                                           "one .safetensors[.xz] file, for machines without the data sources")
    dx.add_argument("config", help="recipe YAML")
    dx.add_argument("overrides", nargs="*", help="e.g. train.seed=1")
    dx.add_argument("-o", "--output", required=True, help="FILE.safetensors or FILE.safetensors.xz (compressed)")
    dx.add_argument("--epochs", type=int, default=1, help="epochs of the data order to write (default 1)")
    dx.set_defaults(fn=_data_export)
    e = sub.add_parser("eval", help="every method side by side per time step: tables, plots, results JSON")
    e.add_argument("--suite", default="chitchat", choices=["chitchat", "icl", "recall"])
    e.add_argument("--adapter", action="append", default=None,
                   help="NAME=PATH, repeatable; replaces the suite's default adapters (names: ccm_concat, ccm_merge, "
                        "concat_nr, merge_nr, gist, gist_online, each optionally with a _suffix)")
    e.add_argument("--raw-tail", action="append", default=None,
                   help="NAME=K, repeatable: read adapter NAME with its newest K chunks kept raw instead of its own "
                        "tail (K = 0: none); its KV counts the raw tokens, so name it ccm_concat for margins at equal "
                        "KV (a ccm_concat_* sibling is shown, not compared)")
    e.add_argument("--presses", default="snapkv,streamingllm,knorm,kvzip",
                   help="kvpress presses, comma-separated ('' for none): snapkv, streamingllm, knorm, kvzip, tova, "
                        "expected_attention")
    e.add_argument("--training-free", default="window,streamingllm", help="ccmem's own KV-budget baselines")
    e.add_argument("--ts", default=None, help="time steps, e.g. 1,2,4,8,16 (default: the suite's)")
    e.add_argument("--limit", type=int, default=None,
                   help="dialogs (chitchat, 100), items per task (icl, 100) or facts per distance (recall, 100)")
    e.add_argument("--base-adapter", default=None,
                   help="stage-1 adapter folded into the reference model of the baselines, or 'none' for the plain "
                        "base model (default: the suite's; use 'none' for adapters trained without stage 1, such as "
                        "the general one)")
    e.add_argument("--format", default="auto", choices=["auto", "plain", "template"],
                   help="how the chit-chat and recall suites render turns: 'A: / B:' lines (plain) or the tokenizer's "
                        "chat template; auto (default) takes the format the adapters' recipes were trained on")
    e.add_argument("--mode", default="auto", choices=["auto", "parallel", "online"])
    e.add_argument("--check", type=int, default=2, help="contexts per t scored both ways (parallel vs online)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", default="benchmarks/results")
    e.add_argument("--name", default=None, help="results file name (default eval_<suite>)")
    e.add_argument("--device", default=None)
    e.add_argument("--control", action="store_true",
                   help="also score each CCM adapter on another context's memory (<name>_other): what its memory of "
                        "the right context adds beyond what the adapter gives any context")
    e.add_argument("--dialogs", default="chitchat", choices=DIALOG_CHOICES,
                   help="chitchat and recall suites: the chit-chat test split (default), or a held-out dialog domain: "
                        "office (The Office transcripts, never trained on) or shakespeare (the plays); "
                        "shakespeare:test reads only the held-out quarter of the plays, for adapters trained on the "
                        "other plays (recipe data part source: script)")
    e.add_argument("--facts", type=int, default=1,
                   help="recall suite: facts stated together in the fact turn, one of them asked (1-3; more facts "
                        "per turn is a harder test of what the memory holds)")
    e.add_argument("--no-generate", action="store_true",
                   help="score the recall suite by multiple choice only, without greedy replies (exact match): "
                        "most of its time goes to generating")
    e.add_argument("--frontier", action="store_true",
                   help="every method at 1, 2, 4, 8 KV slots per context step (t = 8, 12 for chitchat; 8, 16 for "
                        "icl / recall) -> frontier_<suite>.{json,md,png}")
    e.add_argument("--score-cache", nargs="?", const=True, default=None, metavar="DIR",
                   help="reuse the scores of the methods without an adapter (no/full context, window, StreamingLLM, "
                        "kvpress presses) from earlier runs with the same model, groups, budgets and code, and keep "
                        "new ones (default folder: ~/.cache/ccmem/eval-scores, or $CCMEM_CACHE/eval-scores)")
    e.set_defaults(fn=_eval)
    args = ap.parse_args(argv)
    return args.fn(args)


# errors a user fixes without the traceback: ccmem's own (each names the fix) and a path that is not there or not
# readable; anything else keeps its traceback, since it may be a bug
USER_ERRORS = (CCMError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def console(argv: list[str] | None = None) -> int:
    """The ``ccmem`` command: :func:`main`, with a user's error (:data:`USER_ERRORS`) printed as one line instead of
    a traceback, exit status 2, and a closed pipe (``ccmem ... | head``) ending quietly. ``CCMEM_DEBUG=1`` shows
    the traceback. :func:`main` itself raises, for callers and tests that want the exception."""
    try:
        return main(argv)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
    except USER_ERRORS as e:
        if os.environ.get("CCMEM_DEBUG", "0") not in ("", "0"):
            raise
        kind = "" if isinstance(e, CCMError) else f"{type(e).__name__}: "
        print(f"ccmem: error: {kind}{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console())
