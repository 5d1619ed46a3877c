"""Training: the parallel formulation, on accelerate, with exact resume.

One optimizer step = one global batch of ``batch_size * grad_accum * world_size`` episodes. Which episodes form the
batch of step s is a pure function of (seed, s), and each micro-batch goes to rank ``j % world``; so a resumed run
and a multi-process run see exactly the data a single uninterrupted run would. Checkpoints hold the trainable
state as a loadable adapter plus optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .data.collate import Collator, kl_at, lm_loss_at, loss_by_owner, loss_positions
from .data.dialog import part_of
from .data.episode import Episode, strip_eos
from .errors import CCMError, ConfigError
from .metrics import perplexity


class NonFiniteLossError(CCMError, FloatingPointError):
    """Training produced a NaN/inf loss; the run stopped and the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/ccm"
    mode: str = "compress"  # "compress" (stage 2) or "full" (stage 1: plain LoRA on full context)
    max_steps: int = 100
    batch_size: int = 4  # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 3e-4
    emb_lr: float | None = None  # learning rate of the ⟨COMP⟩ embeddings (None: the same as lr)
    gate_lr: float = 1e-2  # learning rate of the memory gates (logit biases: Adam moves them about this much a step)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    max_length: int = 1024
    seed: int = 42
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (accelerate)
    compile: str = ""  # torch.compile backend for the model's forward ("inductor" on a GPU; "" = off)
    gradient_checkpointing: bool = False
    pack: int = 0  # pack each micro-batch's episodes into rows of at most this many tokens (0: pad each episode)
    loss_per: str = "token"  # "episode": the mean of per-episode means (a batch of B == B batches of 1 accumulated)
    # weight of distillation: the loss is (1 - distill) * cross-entropy + distill * KL(teacher || student), where the
    # teacher is the same model reading the raw past instead of the memory (one extra forward without gradient)
    distill: float = 0.0
    # the teacher: "raw" (the model reading the raw past, no memory: the base or stage-1 model) or "raw+memory" (text
    # rows read the raw past and the memory: the adapter's prior on top of the raw past; see benchmarks/distill_teacher)
    teacher: str = "raw"
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_batches: int = 8
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0 = no limit
    # stop (and save) after this step while the learning-rate schedule still runs to max_steps: two branches of one
    # run (e.g. with and without distillation) stop at the same step on the same schedule; 0 = no stop
    stop_at: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mixed_precision in (False, None):  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mode not in ("compress", "full"):
            raise ValueError(f"train.mode must be 'compress' or 'full', got {self.mode!r}")
        if self.compile and self.compile not in ("inductor", "eager", "aot_eager", "cudagraphs"):
            raise ValueError(f"train.compile must be '' or a torch.compile backend (inductor, aot_eager, eager, "
                             f"cudagraphs), got {self.compile!r}")
        if self.stop_at < 0:
            raise ValueError(f"train.stop_at is a step (0 = no stop), got {self.stop_at!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"train.distill is the weight of the KL term, in [0, 1]; got {self.distill!r}")
        if self.teacher not in ("raw", "raw+memory"):
            raise ValueError(f"train.teacher must be 'raw' or 'raw+memory', got {self.teacher!r}")
        if self.distill and self.mode != "compress":
            raise ValueError("train.distill needs train.mode 'compress': in stage 1 the model already reads the raw "
                             "past, so there is nothing to distill")


class StepLoss(NamedTuple):
    """One micro-batch's forward: the loss to train on, its attended token count, the plain cross-entropy
    (differs from ``loss`` under distillation) and, when asked, each episode's (sum, count)."""

    loss: Any
    tokens: int
    ce: torch.Tensor
    per_episode: tuple[torch.Tensor, torch.Tensor] | None = None


class Source:
    """Anything indexable by (index, epoch) -> Episode; plain sequences ignore the epoch."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, i: int, epoch: int) -> Episode:
        return self.data.get(i, epoch) if hasattr(self.data, "get") else self.data[i]


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The data order of one epoch, computed once per epoch (a batch rarely spans more than two)."""
    perm = list(range(n))
    random.Random(f"{seed}:perm:{epoch}").shuffle(perm)
    return tuple(perm)


def global_batch(step: int, n: int, size: int, seed: int) -> list[tuple[int, int]]:
    """(index, epoch) pairs of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    out = []
    for p in range(step * size, (step + 1) * size):
        epoch, pos = divmod(p, n)
        out.append((epoch_permutation(n, seed, epoch)[pos], epoch))
    return out


class Trainer:
    """Trains a CompressedModel's trainable parameters on episodes (nanoGPT-style loop, accelerate underneath)."""

    def __init__(self, ccm: Any, train_data: Any, config: TrainConfig, eval_data: Sequence[Episode] | None = None,
                 accelerator: Any = None, pad_id: int = 0, on_log: Callable[[dict], None] | None = None):
        from accelerate import Accelerator

        self.ccm, self.cfg = ccm, config
        precision, fell_back = config.mixed_precision, False
        if accelerator is None and precision == "bf16" and not torch.cuda.is_available():
            from .hardware import cpu_bf16_native

            # a recipe tuned on a CPU with bf16 must not run 20x slower on one without (None: cannot tell, trust it)
            fell_back = cpu_bf16_native() is False
            precision = "no" if fell_back else precision
        self.acc = accelerator or Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        if fell_back and self.acc.is_main_process:
            print("[ccmem] this CPU has no native bf16 (neither AVX512-BF16 nor AMX), where bf16 autocast trains "
                  "about 20x slower than fp32: training in fp32 instead of the recipe's bf16")
        if getattr(ccm, "backend", "sdpa") == "flex" and self.acc.device.type == "cpu":
            raise ConfigError("the flex attention backend cannot train on a CPU (FlexAttention has no CPU backward in "
                              "torch 2.13); attach with attn_implementation='sdpa' here, 'flex' on a GPU")
        self.train = Source(train_data)
        self.eval_data = list(eval_data or [])
        mode = "compress" if config.mode == "compress" else "full"
        self.collate = Collator(ccm.tokens, ccm.config.variant, mode=mode, pad_id=pad_id, max_length=config.max_length,
                               raw_tail=ccm.config.raw_tail, pack=config.pack, loss_per=config.loss_per)
        self.on_log = on_log
        if config.gradient_checkpointing:
            ccm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        named = ccm.trainable_named_parameters()
        emb = [p for n, p in named.items() if n == "comp_embedding"]
        gates = [p for n, p in named.items() if n.startswith("gate.")]
        rest = [p for n, p in named.items() if n != "comp_embedding" and not n.startswith("gate.")]
        groups = [{"params": rest}, {"params": emb, "lr": config.emb_lr or config.lr}]
        if gates:
            groups.append({"params": gates, "lr": config.gate_lr})
        self.opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        warm = math.ceil(config.warmup_ratio * config.max_steps)
        self.sched = get_cosine_schedule_with_warmup(self.opt, warm, config.max_steps)
        self.model, self.opt = self.acc.prepare(ccm.model, self.opt)
        if config.compile:  # the hooks and ccmem's attention function trace through dynamo (graph breaks at the
            # data-dependent ⟨COMP⟩ row count); checkpoints hold the same state either way
            self.model = torch.compile(self.model, backend=config.compile, dynamic=True)
        self.step = 0
        self.history: list[dict] = []
        self.out = Path(config.output_dir)

    # ------------------------------------------------------------------ one step
    def _forward_loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean", distill: float = 0.0,
                      episodes: int = 0) -> StepLoss:
        """The loss of one micro-batch; with ``episodes`` (how many it holds) also each episode's detached (sum,
        count) of cross-entropy, for the per-part losses of the log."""
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        seg, w = batch.get("segments"), batch.get("loss_weights")
        extra = self.ccm.parallel_inputs(ids, am, full_context=self.cfg.mode != "compress", segments=seg)
        keep = loss_positions(labels)  # the LM head runs on target rows only
        with self.acc.autocast():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep, **extra).logits
        loss = ce = lm_loss_at(logits, labels, keep, reduction, weights=w)
        if distill:
            with torch.no_grad(), self.acc.autocast():
                how = {"raw_and_memory": True} if self.cfg.teacher == "raw+memory" else {"raw_context": True}
                training = self.model.training
                if self.cfg.teacher == "raw+memory":  # its text rows read the memory: no dropout in writing it
                    self.model.eval()
                teacher = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep,
                                     **self.ccm.parallel_inputs(ids, am, segments=seg, **how)).logits
                self.model.train(training)
            loss = (1 - distill) * loss + distill * kl_at(logits, teacher, labels, keep, weights=w)
        per_episode = None
        if episodes and "owner" in batch:
            with torch.no_grad():
                per_episode = loss_by_owner(logits.detach(), labels, keep, batch["owner"], episodes)
        return StepLoss(loss, int(am.sum()), ce, per_episode)

    def _micro_pairs(self, step: int) -> list[list[tuple[int, int]]]:
        """(index, epoch) of this rank's episodes of ``step``, one list per micro-batch."""
        world, rank, c = self.acc.num_processes, self.acc.process_index, self.cfg
        size = c.batch_size * c.grad_accum * world
        pairs = global_batch(step, len(self.train), size, c.seed)
        micro = [pairs[j * c.batch_size:(j + 1) * c.batch_size] for j in range(c.grad_accum * world)]
        return [m for j, m in enumerate(micro) if j % world == rank]

    def _micro_batches(self, step: int) -> list[list[Episode]]:
        return [[self.train.get(i, e) for i, e in m] for m in self._micro_pairs(step)]

    def _part_losses(self, sums: torch.Tensor) -> dict:
        """Log fields of a mixture's per-part (sum, count) over one step, summed over ranks: each part's mean
        next-token cross-entropy (``part_loss``) and its target tokens (``part_tokens``), for the parts the step
        drew."""
        if self.acc.num_processes > 1:
            sums = self.acc.reduce(sums, reduction="sum")
        sums, names = sums.cpu(), self.train.data.names
        seen = [j for j in range(len(names)) if sums[j, 1] > 0]
        return {"part_loss": {names[j]: float(sums[j, 0] / sums[j, 1]) for j in seen},
                "part_tokens": {names[j]: int(sums[j, 1]) for j in seen}}

    @functools.cached_property
    def hardware(self) -> str:
        """What the run trains on, for the log (a run may move between machines: each row says where it ran)."""
        from .hardware import device_name

        n, name = self.acc.num_processes, device_name(self.acc.device)
        return f"{n} x {name}" if n > 1 else name

    def train_step(self) -> dict:
        self.model.train()
        t0 = time.perf_counter()
        micro = self._micro_pairs(self.step)
        mixed = hasattr(self.train.data, "names") and hasattr(self.train.data, "starts")  # a Mixture or its export
        parts = torch.zeros(len(self.train.data.names) if mixed else 0, 2, dtype=torch.float64, device=self.acc.device)
        total, tokens, ce = 0.0, 0, 0.0
        for a, pairs in enumerate(micro):
            sync = a == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not sync and self.acc.num_processes > 1 else _null()
            eps = [self.train.get(i, e) for i, e in pairs]
            with ctx:
                out = self._forward_loss(self.collate(eps), distill=self.cfg.distill, episodes=len(eps) if mixed else 0)
                loss = out.loss
                if loss.requires_grad:  # a micro-batch with no ⟨COMP⟩ row (e.g. all chunks in the raw tail) adds 0
                    self.acc.backward(loss / len(micro))
            total += float(loss.detach()) / len(micro)
            ce += float(out.ce.detach()) / len(micro)
            tokens += out.tokens
            if out.per_episode is not None:  # (sum, count) of each episode onto its part, kept on the device
                pid = torch.tensor([part_of(self.train.data.starts, i) for i, _ in pairs], device=parts.device)
                parts.index_add_(0, pid, torch.stack(out.per_episode, 1))
        loss_t = torch.tensor([total], device=self.acc.device)
        loss_all = float(self.acc.reduce(loss_t, reduction="mean")) if self.acc.num_processes > 1 else total
        if not math.isfinite(loss_all):
            self.opt.zero_grad(set_to_none=True)
            last = self.latest_checkpoint()
            raise NonFiniteLossError(
                f"loss became {loss_all} at step {self.step + 1}; the run stopped without applying this update. "
                f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data, then resume."
            )
        norm = self.acc.clip_grad_norm_(self.ccm.trainable_parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        world = self.acc.num_processes
        return {"step": self.step, "loss": loss_all, "lr": self.sched.get_last_lr()[0],
                "grad_norm": float(norm), "tokens_per_s": tokens * world / dt, "seconds": dt,
                "samples": self.cfg.batch_size * self.cfg.grad_accum * world, "tokens": tokens * world,
                "hardware": self.hardware, "precision": self.acc.mixed_precision,
                **({"ce": ce} if self.cfg.distill else {}),
                **(self._part_losses(parts) if len(parts) else {})}

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train up to ``max_steps`` (or ``stop_after`` more steps, to simulate an interrupted run)."""
        from tqdm.auto import tqdm

        end = self.cfg.max_steps if stop_after is None else min(self.cfg.max_steps, self.step + stop_after)
        if self.cfg.stop_at:
            end = min(end, self.cfg.stop_at)
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not self.acc.is_main_process,
                   desc=f"train {self.cfg.mode}", dynamic_ncols=True)
        start = time.perf_counter()
        while self.step < end:
            if self.cfg.max_minutes and time.perf_counter() - start > 60 * self.cfg.max_minutes:
                path = self.save_checkpoint()  # a time-boxed run (a GPU lease) continues from here
                print(f"[ccmem] time limit of {self.cfg.max_minutes} min reached at step {self.step}; saved {path}")
                break
            rec = self.train_step()
            if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.eval_data:
                rec["eval_ppl"] = self.evaluate()
            self.history.append(rec)
            if self.on_log and self.acc.is_main_process:
                self.on_log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            periodic = self.cfg.save_every and (self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps)
            if periodic or self.step == self.cfg.stop_at:  # a branch that stops early is resumable like a time limit
                self.save_checkpoint()
        bar.close()
        return self.history

    @torch.no_grad()
    def evaluate(self, episodes: Sequence[Episode] | None = None) -> float:
        """Token-pooled perplexity of the outputs (EOS excluded) under the parallel formulation: of all ``episodes``
        when given, else of the first ``eval_batches`` batches of the run's validation episodes."""
        self.model.eval()
        bs = self.cfg.batch_size
        episodes = list(episodes) if episodes is not None else self.eval_data[: bs * self.cfg.eval_batches]
        eos = getattr(self.ccm.tokenizer, "eos_token_id", None)
        nll, count = 0.0, 0
        for i in range(0, len(episodes), bs):
            eps = [strip_eos(e, eos) for e in episodes[i:i + bs]]
            s, c = self._forward_loss(self.collate(eps), reduction="sum").loss
            nll += float(s)
            count += int(c)
        self.model.train()
        return perplexity(nll, count)

    def close(self) -> None:
        """End a run: every rank waits for the others (rank 0 may still be saving), then the process group is
        destroyed. A rank that exits with its gloo/NCCL group still alive can abort in the group's destructor
        ("terminate called without an active exception") and fail an otherwise finished ``torchrun`` job."""
        self.acc.wait_for_everyone()
        self.acc.end_training()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step_{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def save_checkpoint(self) -> Path:
        self.acc.wait_for_everyone()
        d = self.checkpoint_dir(self.step)
        if self.acc.is_main_process:
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.ccm.save_pretrained(tmp)
            torch.save({"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                        "rng": _rng_state(), "config": asdict(self.cfg), "history": self.history},
                       tmp / "trainer_state.pt")
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
            for old in sorted((self.out / "checkpoints").glob("step_*"))[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return d

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the latest checkpoint in output_dir; False if there is none."""
        d = Path(path) if path else self.latest_checkpoint()
        if d is None:
            return False
        self.ccm.load_adapter(d)
        st = torch.load(d / "trainer_state.pt", weights_only=True)  # tensors and plain containers only
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        self.step, self.history = st["step"], st.get("history", [])
        return True

    def write_log(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.out / "train_log.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (a folder under ``output_dir/checkpoints`` with its trainer state)."""
    found = sorted((Path(output_dir) / "checkpoints").glob("step_*/trainer_state.pt"))
    return found[-1].parent if found else None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
