"""``CompressedModel``: a Hugging Face decoder plus ⟨COMP⟩ embeddings, gated LoRA and the ccmem attention backend.

Attaching installs hooks and registered functions only; the model's classes, modules and weights stay the stock
transformers ones, and ``detach()`` returns it to its original behaviour.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .attention import BACKENDS, STATE_ATTR, attention_modules, register_backends
from .config import DEFAULT_TARGETS, CompressionConfig
from .embedding import ATTR as EMB_ATTR
from .embedding import attach_embedding, embedding_owner
from .errors import AlreadyAttachedError, IncompatibleError, InputError, UnsupportedModelError
from .gate import ATTR as GATE_ATTR
from .gate import attach_gate, gate_parameters, memory_kwargs_hook, remove_gate
from .lora import ATTR as LORA_ATTR
from .lora import attach_lora, lora_linears, lora_modules, merge_and_remove_lora
from .masks import (
    comp_mask_function,
    dense_mask,
    full_context_mask_function,
    memory_mask_function,
    raw_and_memory_mask_function,
    raw_context_mask_function,
    to_additive,
)
from .merging import merge_plan
from .positions import skip_position_ids
from .state import ForwardState
from .tokens import CompTokens, register_with_tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3",
                         "granite", "smollm3")
#: families whose attention projects q, k and v with one fused matrix: the default LoRA targets become these
FUSED_TARGETS = {"phi3": ("qkv_proj", "o_proj")}
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STAGE1_KEY = "ccmem_stage1"  # model.config entry naming the stage-1 adapter folded into the weights (saved with them)
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "comp_base",
)


class CompressedModel:
    """A decoder that compresses its own context into ⟨COMP⟩ keys/values. Build it with :meth:`attach`."""

    def __init__(self, model: nn.Module, config: CompressionConfig, tokens: CompTokens, tokenizer: Any = None):
        self.model = model
        self.config = config
        self.tokens = tokens
        self.tokenizer = tokenizer
        self.state = ForwardState()
        self._handles: list = []
        self._prev_attn: str | None = None
        self.backend = "sdpa"
        self._grad_flags: dict[str, bool] = {}
        self._ids: dict[tuple, str] = {}  # adapter_id for one state of the weights (see _state)

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(
        cls,
        model: nn.Module,
        config: CompressionConfig | None = None,
        tokenizer: Any = None,
        attn_implementation: str = "sdpa",
    ) -> CompressedModel:
        """Freeze ``model`` and add the trainable compression parts (⟨COMP⟩ embeddings, gated LoRA).

        A model that already carries ccmem is refused (:class:`AlreadyAttachedError`) before anything changes."""
        config = config or CompressionConfig()
        _check_architecture(model)
        check_not_attached(model)
        if attn_implementation not in BACKENDS:
            raise UnsupportedModelError(
                f"attention backend {attn_implementation!r} cannot take ccmem's 4D masks; use one of {BACKENDS}"
            )
        if attn_implementation == "sdpa" and not getattr(model, "_supports_sdpa", True):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no sdpa attention in transformers (e.g. Gemma 2's logit soft-capping); "
                "attach it with attn_implementation='eager'"
            )
        fused = FUSED_TARGETS.get(model.config.model_type)
        if fused and tuple(config.target_modules) == DEFAULT_TARGETS:
            config = replace(config, target_modules=fused)
        vocab = model.get_input_embeddings().weight.shape[0]
        base = vocab
        tokens = CompTokens.for_config(base, config)
        if tokenizer is not None and len(tokenizer) > vocab:
            _check_earlier_comp_tokens(tokenizer, vocab, tokens)
        if tokenizer is not None:
            _pad_tokenizer_to(tokenizer, vocab)
            register_with_tokenizer(tokenizer, tokens)
        self = cls(model, config, tokens, tokenizer)
        self.backend = attn_implementation
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        register_backends()
        prev = str(model.config._attn_implementation or "sdpa")
        self._prev_attn = prev.removeprefix("ccmem_")
        model.set_attn_implementation(f"ccmem_{attn_implementation}")
        for attn in attention_modules(model):
            setattr(attn, STATE_ATTR, self.state)
        self._handles += attach_embedding(model, tokens, self.state, config.conditional)
        self._handles += attach_lora(
            model, config.target_modules, config.lora_r, config.lora_alpha, config.lora_dropout, self.state,
            config.conditional,
        )
        if config.memory_gate is not None:
            attach_gate(attention_modules(model), model.config.num_attention_heads, config.memory_gate)
            decoder = embedding_owner(model, model.get_input_embeddings())
            self._handles.append(decoder.register_forward_pre_hook(memory_kwargs_hook, with_kwargs=True))
        n_lora = len(lora_modules(model))
        n_layers = model.config.num_hidden_layers
        if n_lora != n_layers * len(config.target_modules):
            self.detach(remove_weights=True)
            raise UnsupportedModelError(
                f"found {n_lora} of the {n_layers * len(config.target_modules)} projections {config.target_modules} "
                f"in {type(model).__name__}; set target_modules to the model's projection names"
            )
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        return self

    def detach(self, remove_weights: bool = False) -> nn.Module:
        """Remove every hook and restore the original attention backend; returns the bare model.

        The LoRA and ⟨COMP⟩ weights stay attached (inert) unless ``remove_weights``; until they are removed the model
        cannot be attached again. A stage-1 LoRA folded by :meth:`from_pretrained` stays in the weights."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn in attention_modules(self.model):
            if hasattr(attn, STATE_ATTR):
                delattr(attn, STATE_ATTR)
        if self._prev_attn is not None:
            self.model.set_attn_implementation(self._prev_attn)
        if remove_weights:
            emb = self.model.get_input_embeddings()
            if hasattr(emb, EMB_ATTR):
                delattr(emb, EMB_ATTR)
            for lin in lora_linears(self.model):
                delattr(lin, LORA_ATTR)
            remove_gate(self.model)
            for n, p in self.model.named_parameters():
                p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        return self.model

    # ------------------------------------------------------------------ parameters
    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        out = {"comp_embedding": getattr(self.model.get_input_embeddings(), EMB_ATTR).weight}
        for name, lora in lora_modules(self.model).items():
            out[f"lora.{name}.A"] = lora.A
            out[f"lora.{name}.B"] = lora.B
        for name, gate in gate_parameters(self.model).items():
            out[f"gate.{name}"] = gate
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.trainable_named_parameters().values())

    def adapter_id(self) -> str:
        """Which adapter this model holds, so a memory written by one adapter is not silently read by another: a
        sha256 of the trainable weights in fp32 (for an fp32 adapter file, the checksum the file stores) and of the
        stage 1 folded into the base, if any. While the weights are those loaded from a file it is the file's, in
        whatever dtype or on whatever device they were moved to; after training steps it is of the weights as they
        are. The base model's own weights are not in it (the fingerprint checks only their shapes)."""
        params = self.trainable_named_parameters()
        try:
            state = self._state(params)
        except RuntimeError:  # inference tensors keep no version counter: hash every time
            return self._digest(params)
        if state not in self._ids:
            self._ids = {state: self._digest(params)}
        return self._ids[state]

    def _folded_stage1(self) -> str | None:
        return (getattr(self.model.config, STAGE1_KEY, None) or {}).get("sha256")

    def _state(self, params: dict[str, nn.Parameter]) -> tuple:
        """What adapter_id's cache is keyed on: the stage 1 and each weight's version counter, which moves with every
        in-place change (optimizer steps, copy_) but not with a dtype or device move. Weights swapped without one
        (assigning ``p.data``) keep the old id."""
        return self._folded_stage1(), tuple((id(p), p._version) for p in params.values())

    def _digest(self, tensors: dict[str, torch.Tensor]) -> str:
        own = io.digest({k: t.detach().float() for k, t in tensors.items()})
        stage1 = self._folded_stage1()
        return own if stage1 is None else io.sha256_text(f"{own} stage1 {stage1}")

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    # ------------------------------------------------------------------ parallel formulation
    def parallel_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, full_context: bool = False,
        segments: torch.Tensor | None = None, raw_context: bool = False, raw_and_memory: bool = False,
    ) -> dict[str, Any]:
        """The 4D additive mask, skip position ids and merge plan that make one forward equal the online loop.

        ``segments`` (B, N) numbers the episodes packed into each row (see :func:`ccmem.sequence.pack_rows`): they
        never see each other and each starts at position 0. ``full_context``: plain causal attention (stage 1);
        ``raw_context``: every token reads the raw past and no ⟨COMP⟩ key, i.e. the uncompressed model on the same
        rows (the distillation teacher); ``raw_and_memory``: text rows read the raw past *and* the memory, ⟨COMP⟩
        rows write the memory as in the compressed forward (the ``raw+memory`` teacher)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        special = self.tokens.is_special(input_ids)
        if raw_context and raw_and_memory:
            raise ValueError("raw_context and raw_and_memory exclude each other (a teacher without or with memory)")
        if raw_context:
            rule = raw_context_mask_function(input_ids, self.tokens, attention_mask, segments)
        elif raw_and_memory:
            rule = raw_and_memory_mask_function(input_ids, self.tokens, self.config.variant, attention_mask,
                                                self.config.sink, segments)
        elif full_context:
            rule = full_context_mask_function(attention_mask, segments)
        else:
            rule = comp_mask_function(input_ids, self.tokens, self.config.variant, attention_mask, self.config.sink,
                                      segments)
        pos = skip_position_ids(special, self.config.n_tok, attention_mask, segments=segments)
        if int(pos.max()) >= self.max_positions:
            raise InputError(
                f"the sequence needs position {int(pos.max())} but the model supports {self.max_positions}; "
                "shorten the episode"
            )
        dtype = self.model.get_input_embeddings().weight.dtype
        b, n = input_ids.shape
        if self.backend == "flex":  # block-sparse: fully masked 128 x 128 blocks are skipped, no N x N tensor
            from torch.nn.attention.flex_attention import create_block_mask

            mask: Any = create_block_mask(rule, b, None, n, n, device=input_ids.device)
        else:
            mask = to_additive(dense_mask(rule, b, n, device=input_ids.device), dtype)
        out = {"attention_mask": mask, "position_ids": pos}
        # raw context: SUM rows still get their (unread) merge; no query reads memory, so no gate
        plan = None if full_context and not raw_context else merge_plan(input_ids, self.tokens, segments)
        if plan is not None:
            out["ccmem_merge"] = plan
        if self.gated and not (full_context or raw_context):
            memory = memory_mask_function(input_ids, self.tokens, self.config.variant, attention_mask,
                                          self.config.sink, segments)
            out["ccmem_memory"] = dense_mask(memory, *input_ids.shape, device=input_ids.device)
        return out

    @property
    def gated(self) -> bool:
        """Whether this model biases its attention to memory slots (a memory gate, :mod:`ccmem.gate`)."""
        return self.config.memory_gate is not None

    def parallel_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """One forward pass over whole episodes (every chunk followed by its ⟨COMP⟩ group, then input and output)."""
        extra = self.parallel_inputs(input_ids, attention_mask)
        return self.model(input_ids=input_ids, use_cache=False, **extra, **kwargs)

    # ------------------------------------------------------------------ identity and files
    def fingerprint(self) -> dict[str, Any]:
        """What an adapter or memory file must agree with to be used on this model."""
        return model_fingerprint(self.model, self.tokens.base)

    def check_fingerprint(self, other: dict[str, Any], what: str) -> None:
        check_fingerprint(self.fingerprint(), other, what)

    def check_config(self, other: dict[str, Any], what: str) -> None:
        mine = self.config.to_dict()
        keys = ("variant", "n_tok", "sink", "raw_tail")
        bad = [k for k in keys if other.get(k, 0 if k == "raw_tail" else None) != mine[k]]
        if bad:
            diffs = ", ".join(f"{k}: file {other.get(k)!r} vs model {mine[k]!r}" for k in bad)
            raise IncompatibleError(
                f"{what} was made with another compression config ({diffs}); attach the model with the same "
                "CompressionConfig (CompressedModel.from_pretrained reads it from the adapter)", fields=tuple(bad)
            )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the trainable state (safetensors, checksummed) and a readable ``adapter_config.json``."""
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"format_version": io.FORMAT_VERSION, "kind": "adapter", "compression": self.config.to_dict(),
                  "base": self.fingerprint()}
        io.save_checked(directory / ADAPTER_FILE, self.trainable_named_parameters(), header)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def _resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
        p = Path(path_or_id)
        if p.is_dir():
            return p / ADAPTER_FILE
        if p.is_file():
            return p
        if os.path.sep in str(path_or_id) and not str(path_or_id).count("/") == 1:
            raise FileNotFoundError(f"adapter folder {path_or_id} does not exist")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(str(path_or_id), ADAPTER_FILE, revision=revision))
        except Exception as e:
            raise FileNotFoundError(
                f"{path_or_id!r} is neither a local adapter folder nor a reachable hub repository ({e})"
            ) from e

    @staticmethod
    def _stage1(path_or_id: str | os.PathLike, revision: str | None = None) -> Path | None:
        """The stage-1 (full-context) adapter shipped inside a stage-2 adapter, local or on the hub, if any."""
        local = Path(path_or_id)
        if local.exists():
            folder = local if local.is_dir() else local.parent
            return folder / "stage1" if (folder / "stage1" / ADAPTER_FILE).is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(str(path_or_id), f"stage1/{ADAPTER_FILE}", revision=revision))
        except Exception:  # the repository has no stage 1
            return None

    @classmethod
    def read_adapter(cls, path_or_id: str | os.PathLike, revision: str | None = None):
        tensors, header = io.load_checked(cls._resolve(path_or_id, revision), kind="adapter")
        if header.get("kind") != "adapter":
            raise IncompatibleError(f"{path_or_id} holds a ccmem {header.get('kind')!r} file, not an adapter")
        if header.get("format_version", 0) > io.FORMAT_VERSION:
            raise IncompatibleError(
                f"{path_or_id} uses adapter format {header['format_version']}, newer than this ccmem "
                f"({io.FORMAT_VERSION}); upgrade ccmem"
            )
        return tensors, header

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        model: nn.Module,
        tokenizer: Any = None,
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        raw_tail: int | None = None,
    ) -> CompressedModel:
        """Attach a saved adapter (a local folder or a hub repository id) to ``model``.

        ``raw_tail``: read with this raw tail instead of the adapter's own (``CompressionConfig.raw_tail``). The tail
        is a reading layout, not a weight: the newest chunks stay verbatim and the rest is compressed as trained, so
        an adapter trained without a tail can keep the last turn raw (for concat the KV held grows by that turn's
        tokens less its n_tok slots).

        If the adapter ships a stage 1 (a ``stage1/`` folder: the full-context LoRA of the two-stage recipe), its LoRA
        is folded into ``model``'s own weights **in place** (see :func:`fold_stage1`): the caller's model is changed
        for good, ``detach()`` does not undo it, and the fold is recorded in ``model.config`` so a second
        ``from_pretrained`` on the same model does not add it again. Load a fresh model to get the base back."""
        _check_architecture(model)
        check_not_attached(model)
        tensors, header = cls.read_adapter(path_or_id, revision)
        config = CompressionConfig.from_dict(header["compression"])
        if raw_tail is not None:
            config = replace(config, raw_tail=raw_tail)  # validated again: a gist adapter has no tail
        check_fingerprint(model_fingerprint(model), header["base"], f"adapter {path_or_id}")
        stage1 = cls._stage1(path_or_id, revision)
        if stage1 is not None:  # two-stage recipe: fold the full-context LoRA into the base weights first
            probe = cls.attach(model, config)  # but only once the stage-2 tensors are known to fit: the fold is
            try:  # for good, and a refusal after it would leave the caller's model changed
                probe._check_tensors(tensors, str(path_or_id))
            finally:
                probe.detach(remove_weights=True)
            fold_stage1(model, stage1)
        self = cls.attach(model, config, tokenizer, attn_implementation)
        try:
            self._load_tensors(tensors, str(path_or_id))
        except Exception:
            self.detach(remove_weights=True)
            raise
        return self

    def load_adapter(self, path_or_id: str | os.PathLike, revision: str | None = None,
                     across_variants: bool = False, grow: bool = False) -> None:
        """Load saved trainable weights into this already attached model (configs must agree, except the raw tail:
        a reading layout, not a weight, so a run with a tail can warm-start from an adapter trained without one).

        ``across_variants``: a warm start of one memory update from an adapter of another (a merge run from a concat
        adapter): the LoRA, the gates and the n ⟨COMP⟩ embeddings are the same weights in both; a merge model's SUM
        placeholder rows, which a concat adapter lacks, keep this model's own initialisation (dropped the other way).

        ``grow``: a warm start of a larger LoRA (a higher rank, more target modules such as the MLP) from a smaller
        one, computing exactly the function the adapter computes (:meth:`_grown`), so training starts where the
        adapter ended and only the new capacity is fresh.
        """
        tensors, header = self.read_adapter(path_or_id, revision)
        self.check_fingerprint(header["base"], f"adapter {path_or_id}")
        theirs = {**header["compression"], "raw_tail": self.config.raw_tail}
        other_variant = across_variants and theirs.get("variant") != self.config.variant
        if other_variant:
            theirs["variant"] = self.config.variant
        self.check_config(theirs, f"adapter {path_or_id}")  # n_tok and sink still agree before any row is moved
        if other_variant:
            tensors = dict(tensors)
            mine = self.trainable_named_parameters()["comp_embedding"]
            emb, n = tensors.get("comp_embedding"), self.config.n_tok
            if emb is not None and emb.shape[0] != mine.shape[0] and emb.shape[1:] == mine.shape[1:]:
                rows = mine.detach().clone()  # this model's own SUM rows, exactly
                rows[:n] = emb[:n].to(rows.dtype)  # the ⟨COMP⟩ rows come first in both tables
                tensors["comp_embedding"] = rows
        if grow:
            tensors = self._grown(tensors, header["compression"], str(path_or_id))
        self._load_tensors(tensors, str(path_or_id))

    @torch.no_grad()
    def _grown(self, tensors: dict[str, torch.Tensor], theirs: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        """The adapter's weights laid into this model's larger LoRA: its rank-r A rows and B columns first (B rescaled
        by the ratio of the two alpha / r scales), the new B columns and the new modules' B zero, the new A rows at
        this model's own initialisation. B A is then unchanged on every old module and zero on every new one: the
        same function, with the new directions free to learn. Refused where this model is smaller (a lower rank, a
        module the adapter has and it lacks): that would drop trained weights."""
        r_old = int(theirs.get("lora_r", 8))
        r_new = self.config.lora_r
        mine = self.trainable_named_parameters()
        lost = sorted(set(tensors) - set(mine))
        if r_old > r_new or lost:
            why = (f"its LoRA rank {r_old} is above this model's {r_new}" if r_old > r_new
                   else f"it has weights this model lacks ({', '.join(lost[:3])})")
            raise IncompatibleError(f"adapter {where} cannot grow into this model: {why}; attach the model with a "
                                    "rank and target_modules at least the adapter's",
                                    fields=("lora_r",) if r_old > r_new else ("target_modules",))
        ratio = (float(theirs.get("lora_alpha", 16.0)) / r_old) / self.config.lora_scale
        out = {}
        for k, p in mine.items():
            t = tensors.get(k)
            is_a, is_b = k.startswith("lora.") and k.endswith(".A"), k.startswith("lora.") and k.endswith(".B")
            if is_b:
                grown = torch.zeros(p.shape, dtype=torch.float32)
                if t is not None:
                    grown[:, :r_old] = t.float() * ratio
            elif is_a:
                grown = p.detach().float().cpu().clone()
                if t is not None:
                    grown[:r_old] = t.float()
            elif t is None:  # a gate or an embedding the adapter lacks would change what the model computes
                raise IncompatibleError(f"adapter {where} cannot grow into this model: it has no {k}; growing adds "
                                        "LoRA rank and modules only (the memory gate, n_tok and variant must agree)",
                                        fields=("memory_gate",) if k.startswith("gate.") else ())
            else:
                grown = t
            out[k] = grown
        return out

    @torch.no_grad()
    def _load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        params = self._check_tensors(tensors, where)
        for k, p in params.items():
            p.copy_(tensors[k].to(p.dtype))
        try:  # the file's weights, as adapter_id would hash them
            self._ids = {self._state(params): self._digest(tensors)}
        except RuntimeError:  # inference tensors: adapter_id hashes the weights each time
            self._ids = {}

    def _check_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, nn.Parameter]:
        """The trainable parameters, once ``tensors`` are known to hold each of them in its shape (else refused)."""
        params = self.trainable_named_parameters()
        missing, unexpected = set(params) - set(tensors), set(tensors) - set(params)
        if missing or unexpected:
            raise IncompatibleError(
                f"adapter {where} does not fit this model: missing {sorted(missing)[:4]}, unexpected "
                f"{sorted(unexpected)[:4]}; it was made for another architecture or target_modules"
            )
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise IncompatibleError(
                    f"adapter {where}: {k} has shape {tuple(tensors[k].shape)}, model needs {tuple(p.shape)}"
                )
        return params

    def session(self, batch_size: int = 1, grad: bool = False):
        """A fresh online :class:`~ccmem.session.Session` (empty memory) on this model."""
        from .session import Session

        return Session(self, batch_size=batch_size, grad=grad)


def fold_stage1(model: nn.Module, path_or_id: str | os.PathLike, revision: str | None = None) -> bool:
    """Fold a stage-1 (full-context) adapter's LoRA into ``model``'s weights in place (W <- W + B A alpha/r), once.

    The one fold of the two-stage recipe (:meth:`CompressedModel.from_pretrained`, ``recipe.prepare_model``). The
    adapter's sha256 is recorded in ``model.config`` (and so saved with the model): folding the same adapter again
    is skipped with a warning (returns False), folding another one on top is refused, since either would add a
    second full-context delta that no adapter was trained on."""
    tensors, header = CompressedModel.read_adapter(path_or_id, revision)
    sha = io.digest(tensors)
    done = getattr(model.config, STAGE1_KEY, None)
    if done is not None:
        if done.get("sha256") == sha:
            warnings.warn(
                f"stage-1 adapter {path_or_id} is already folded into this model's weights (sha256 {sha[:12]}); "
                "not folding it again", stacklevel=3,
            )
            return False
        raise IncompatibleError(
            f"this model's weights already hold stage-1 adapter {done.get('adapter')!r} (sha256 "
            f"{str(done.get('sha256'))[:12]}); folding stage 1 {path_or_id} (sha256 {sha[:12]}) on top would add two "
            "full-context LoRAs; load a fresh model for it"
        )
    _check_architecture(model)
    check_fingerprint(model_fingerprint(model), header["base"], f"stage-1 adapter {path_or_id}")
    ccm = CompressedModel.attach(model, CompressionConfig.from_dict(header["compression"]))
    try:
        ccm._load_tensors(tensors, str(path_or_id))
    except Exception:
        ccm.detach(remove_weights=True)
        raise
    ccm.detach()
    merge_and_remove_lora(model)
    ccm.detach(remove_weights=True)
    setattr(model.config, STAGE1_KEY, {"adapter": str(path_or_id), "sha256": sha})
    return True


def check_not_attached(model: nn.Module) -> None:
    """Refuse a model that already carries ccmem: a second attach would stack a second set of hooks on the first,
    remember ``ccmem_*`` as the backend to restore on ``detach()`` and reuse (or shadow) the first one's weights."""
    live = []  # (a ccmem_* attention implementation alone is no attachment: a model built from an attached one's
    # config has it; attach then restores the plain backend on detach)
    if any(hasattr(a, STATE_ATTR) for a in attention_modules(model)):
        live.append("attention state")
    hooked = [
        m for m in model.modules()
        if any(str(getattr(h, "__module__", "")).startswith("ccmem.")
               for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values())
    ]
    if hooked:
        live.append(f"hooks on {len(hooked)} modules")
    if live:
        raise AlreadyAttachedError(
            f"this {type(model).__name__} already has ccmem attached ({', '.join(live)}); call "
            ".detach(remove_weights=True) on the CompressedModel that holds it first (after a plain .detach() its "
            "⟨COMP⟩/LoRA weights stay on the model and still block a new attach), or attach to a freshly loaded model"
        )
    n_lora = len(lora_linears(model))
    left = (["⟨COMP⟩ embeddings (ccmem_comp)"] if hasattr(model.get_input_embeddings(), EMB_ATTR) else []) + (
        [f"LoRA on {n_lora} projections (ccmem_lora)"] if n_lora else []) + (
        [f"memory gates ({GATE_ATTR})"] if gate_parameters(model) else [])
    if left:
        raise AlreadyAttachedError(
            f"this {type(model).__name__} still carries {' and '.join(left)} from an earlier CompressedModel that was "
            "detached with its weights kept; call .detach(remove_weights=True) on it first (or fold the LoRA with "
            "ccmem.lora.merge_and_remove_lora), or attach to a freshly loaded model"
        )


def _check_architecture(model: nn.Module) -> None:
    c = getattr(model, "config", None)
    if c is None or getattr(c, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a decoder-only transformers model; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {c.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoders with RoPE and q/k/v/o projections)"
        )


def _check_earlier_comp_tokens(tokenizer: Any, vocab: int, tokens: CompTokens) -> None:
    """A tokenizer larger than the embedding is accepted only when what lies past it is the ⟨COMP⟩ tokens an earlier
    attach to this model registered (detach cannot take added tokens back out of a tokenizer), and no more of them
    than this config uses: then attach, detach, attach again works with the same tokenizer object."""
    extra = {i: t for t, i in tokenizer.get_vocab().items() if i >= vocab}
    earlier = [f"<COMP{k}>" for k in range(len(extra))]
    if [extra.get(vocab + k) for k in range(len(extra))] != earlier:
        raise IncompatibleError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {vocab}; pass the model's own "
            "tokenizer"
        )
    if len(extra) > tokens.n_special:
        raise IncompatibleError(
            f"the tokenizer still holds {len(extra)} ⟨COMP⟩ tokens from an earlier attach, more than this adapter's "
            f"{tokens.n_special}; its extra ones would map to ids the model does not embed. Load the tokenizer afresh "
            "(AutoTokenizer.from_pretrained) for this adapter"
        )


def _pad_tokenizer_to(tokenizer: Any, vocab: int) -> None:
    """Some tokenizers hold fewer tokens than the embedding has rows (Qwen2); fill the gap so ⟨COMP⟩ ids are
    ``vocab ..`` and the reserved rows are never produced by tokenization."""
    if any(t in tokenizer.get_vocab() for t in ("<COMP0>",)):
        return
    gap = vocab - len(tokenizer)
    if gap > 0:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [f"<ccmem_reserved_{i}>" for i in range(gap)]},
            replace_extra_special_tokens=False,
        )


def model_fingerprint(model: nn.Module, comp_base: int | None = None) -> dict[str, Any]:
    """The architecture facts an adapter or memory must agree with (``name_or_path`` is only informative)."""
    c = model.config
    vocab = model.get_input_embeddings().weight.shape[0]
    return {
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "vocab_size": vocab,
        "comp_base": vocab if comp_base is None else comp_base,
        "name_or_path": getattr(c, "_name_or_path", ""),
    }


def check_fingerprint(mine: dict[str, Any], other: dict[str, Any], what: str) -> None:
    """Raise :class:`IncompatibleError` naming every field where ``other`` disagrees with ``mine``."""
    bad = [k for k in FINGERPRINT_KEYS if other.get(k) != mine.get(k)]
    if bad:
        diffs = ", ".join(f"{k}: file {other.get(k)!r} vs model {mine.get(k)!r}" for k in bad)
        made_for = other.get("name_or_path") or "another model"
        raise IncompatibleError(
            f"{what} was made for a different base model ({diffs}); load it with the model it was made for "
            f"({made_for!r}) or re-create it for this one"
        )
