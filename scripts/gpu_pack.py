"""Get the general adapter's training onto a lent GPU machine, and its checkpoint back.

The run is the one of ``GPU_RECIPE`` (default: ``configs/general_chat_long.yaml``, the long run toward the paper's
budget; ``GPU_RECIPE=configs/general_chat.yaml`` for the finished 4000-step one); its checkpoint folder is the
recipe's ``train.output_dir``.

A device call carries at most 64 MiB of working tree; the default model alone (SmolLM2's GGUF) is 94 MiB and the
shipped adapters 41 MiB, and that machine has neither the data sources nor our transformers. So the work is split
in two calls on one warm machine (it keeps ignored files between calls for about 30 s of idleness):

  python scripts/gpu_pack.py pack     # here: .gpu/a (wheels + GGUF part 1), .gpu/b (GGUF part 2 + the recipe's
                                      # training episodes, `ccmem data export`, ~4 CPU minutes the first time,
                                      # + run.env: which recipe and checkpoint folder gpu_train.sh resumes)
  python scripts/gpu_pack.py hide     # here: adapters/, checkpoints/, benchmarks/results/ stop travelling
  run  bash scripts/gpu_train.sh bench    carry [.gpu/a]                                 (throughput, ~4 min;
                                                                                         BENCH_S=0: none)
  run  bash scripts/gpu_train.sh train    carry [.gpu/b, <train.output_dir>]             (training, ~8 min;
                                                                                         pack prints the carry)
  python scripts/gpu_pack.py unhide   # here, always, right after (restores the index; nothing is lost)
  python scripts/gpu_pack.py land /work/.device/...   # the returned checkpoint replaces the committed one

Issue the second call at once: an idle machine goes back after about 30 s, and .gpu/a with it. Stop any CPU run of
the same checkpoint (scripts/continue_general.sh) before `hide`; it would write the same folder too.
`hide` never touches files: it only removes those folders from git's index and ignores them;
`unhide` puts the index back. Commit nothing in between: `unhide` refuses if HEAD moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / ".gpu"
RECIPE = os.environ.get("GPU_RECIPE", "configs/general_chat_long.yaml")
HIDDEN = ("adapters", "checkpoints", "benchmarks/results")  # none is read on the GPU (its benchmark writes anew)
MARK = "# gpu_pack hide"
LIMIT = 64 * 2**20
WHEELS = ("transformers==5.24.0", "gguf==0.19.0")
EPOCHS = 2  # general_chat: 9,588 episodes an epoch, 2.39 MB xz for 2; a third would not fit call b beside the model


def run_dir(recipe: str = RECIPE) -> Path:
    """The recipe's checkpoint folder (``train.output_dir``), which the GPU run resumes and ``land`` replaces."""
    import yaml

    out = (yaml.safe_load((ROOT / recipe).read_text()).get("train") or {}).get("output_dir")
    if not out:
        sys.exit(f"{recipe} names no train.output_dir: the GPU run needs a committed checkpoint folder to resume")
    return ROOT / out


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _tree_size() -> int:
    """Bytes of what travels without carry: tracked and untracked-not-ignored files."""
    files = _sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file() and not (ROOT / f).is_symlink())


def _export_is_current(episodes: Path) -> bool:
    """Whether an earlier export holds what the recipe trains on now: its data section and seed, and (for a mix)
    the parts table that the per-part training log needs (exports from before it lack one)."""
    if not episodes.is_file():
        return False
    from ccmem.data import EpisodeFile
    from ccmem.errors import CCMError
    from ccmem.recipe import load_recipe
    from ccmem.training import TrainConfig

    cfg = load_recipe(ROOT / RECIPE)
    try:
        f = EpisodeFile(episodes)
    except CCMError:
        return False
    current = f.meta.get("data") == cfg["data"] and f.meta.get("seed") == TrainConfig(**cfg["train"]).seed
    if not current or (cfg["data"].get("source") == "mix" and not hasattr(f, "names")):
        print(f"[gpu_pack] {episodes.name} was exported for other data or before mix parts were kept: exporting again")
        return False
    return True


def pack(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from ccmem.models import GGUF_FILE, smollm2_gguf_folder
    from ccmem.training import latest_checkpoint

    a, b = GPU / "a", GPU / "b"
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    run = run_dir()
    episodes = b / f"{Path(RECIPE).stem}.safetensors.xz"
    if latest_checkpoint(run) is None:
        sys.exit(f"{run} holds no checkpoint: the GPU run resumes one (its init_adapter does not travel); train a "
                 f"few steps here first (RECIPE={RECIPE} scripts/continue_general.sh train.stop_at=N) and commit "
                 "the checkpoint")
    for stale in b.glob("*.safetensors.xz"):
        if stale != episodes:
            stale.unlink()  # another recipe's episodes: they would not fit beside these
    rel = run.relative_to(ROOT)
    (b / "run.env").write_text(f"RECIPE={RECIPE}\nRUN={rel}\nEPISODES=.gpu/b/{episodes.name}\n")
    if args.force or not _export_is_current(episodes):
        subprocess.run([sys.executable, "-m", "ccmem", "data", "export", RECIPE, "-o",
                        str(episodes), "--epochs", str(args.epochs)], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    for w in WHEELS:
        name, version = w.split("==")
        for stale in a.glob(f"{name}-*.whl"):
            if not stale.name.startswith(f"{name}-{version}-"):
                stale.unlink()
        if not list(a.glob(f"{name}-{version}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp", "--platform",
                            "manylinux_2_17_x86_64", "-d", str(a), w], check=True)
    gguf = (smollm2_gguf_folder() / GGUF_FILE).read_bytes()
    base = _tree_size() if _hidden() else _tree_size() - sum(_size(ROOT / h) for h in HIDDEN)
    room_a = LIMIT - 2 * 2**20 - base - sum(_size(w) for w in a.glob("*.whl"))
    room_b = LIMIT - 2 * 2**20 - base - _size(episodes) - _size(run)
    if min(room_a, room_b) < 0 or room_a + room_b < len(gguf):
        sys.exit(f"the model does not fit in two calls: the tree without {', '.join(HIDDEN)} is "
                 f"{base / 2**20:.1f} MiB; move large files out of it (or ignore them) and pack again")
    cut = min(len(gguf) - 1, room_a)
    (a / "gguf.part").write_bytes(gguf[:cut])
    (b / "gguf.part").write_bytes(gguf[cut:])
    (b / "gguf.sha256").write_text(f"{hashlib.sha256(gguf).hexdigest()}  {GGUF_FILE}\n")
    call_a = base + _size(a)
    call_b = base + _size(b) + _size(run)
    print(f"call a: {call_a / 2**20:.1f} MiB, call b: {call_b / 2**20:.1f} MiB (limit 64 MiB each; "
          f"the tree without {', '.join(HIDDEN)} is {base / 2**20:.1f} MiB); recipe {RECIPE}, "
          f"call b carries [.gpu/b, {rel}]")
    if max(call_a, call_b) > LIMIT:
        sys.exit("too large for the device calls: export fewer epochs (--epochs) or shrink the tree")


def _exclude() -> Path:
    return ROOT / _sh("git", "rev-parse", "--git-path", "info/exclude").strip()


def _hidden() -> bool:
    ex = _exclude()
    return ex.is_file() and MARK in ex.read_text()


def hide(_: argparse.Namespace) -> None:
    if _hidden():
        print("already hidden")
        return
    if _sh("git", "status", "--porcelain", "--", *HIDDEN).strip():
        sys.exit(f"{', '.join(HIDDEN)} have uncommitted changes: commit them first")
    ex = _exclude()
    ex.parent.mkdir(parents=True, exist_ok=True)
    head = _sh("git", "rev-parse", "HEAD").strip()
    with ex.open("a") as f:
        f.write(f"\n{MARK} {head}\n" + "".join(f"/{h}/\n" for h in HIDDEN) + f"{MARK} end\n")
    _sh("git", "rm", "-r", "-q", "--cached", *HIDDEN)
    print(f"hidden: {', '.join(HIDDEN)} do not travel; tree now {_tree_size() / 2**20:.1f} MiB. "
          "Run `python scripts/gpu_pack.py unhide` after the device calls.")


def unhide(_: argparse.Namespace) -> None:
    ex = _exclude()
    if _hidden():
        text = ex.read_text()
        start = text.index(MARK)
        head = text[start:].split("\n", 1)[0].split()[-1]
        if head != _sh("git", "rev-parse", "HEAD").strip():
            sys.exit(f"a commit was made while {', '.join(HIDDEN)} were hidden: it records them as deleted. "
                     f"Undo it with `git reset --soft {head}` (your changes stay staged), then run unhide again")
        end = text.index(f"{MARK} end\n", start) + len(f"{MARK} end\n")
        ex.write_text(text[:start].rstrip("\n") + "\n" + text[end:])
    _sh("git", "reset", "-q", "--", *HIDDEN)
    print(f"{', '.join(HIDDEN)} are tracked again:")
    print(_sh("git", "status", "--short", "--", *HIDDEN) or "(unchanged)")


def land(args: argparse.Namespace) -> None:
    """Put a checkpoint that came back from the GPU in place of the committed one (one kept), with its log."""
    src = Path(args.folder)
    state = src / "trainer_state.pt"
    if not state.is_file():
        sys.exit(f"{src} holds no trainer_state.pt")
    import torch

    step = torch.load(state, weights_only=True, map_location="cpu")["step"]
    run = run_dir()
    dest = run / "checkpoints" / f"step_{step:06d}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("adapter.safetensors", "adapter_config.json", "trainer_state.pt"):
        shutil.copyfile(src / name, tmp / name)  # (the returned files are read-only; their modes are not wanted)
    for old in (run / "checkpoints").glob("step_*"):
        if old != tmp:
            shutil.rmtree(old)
    tmp.rename(dest)
    if (src / "train_log.jsonl").is_file():
        shutil.copyfile(src / "train_log.jsonl", run / "train_log.jsonl")
    rows = (run / "train_log.jsonl").read_text().splitlines()
    print(f"landed step {step} in {dest}; log has {len(rows)} rows, last {json.loads(rows[-1])['step']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of the training data order to export")
    p.add_argument("--force", action="store_true", help="export the episodes again")
    p.set_defaults(fn=pack)
    sub.add_parser("hide").set_defaults(fn=hide)
    sub.add_parser("unhide").set_defaults(fn=unhide)
    la = sub.add_parser("land")
    la.add_argument("folder", help="the folder the device's files came back to")
    la.set_defaults(fn=land)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
