"""Shared helpers of the benchmark scripts: environment facts and the results-file format (shared/design/results.md)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccmem.evaluation.report import markdown_table  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    from ccmem.evaluation.report import environment as env

    return env()


def random_smollm2():
    """The SmolLM2-135M architecture with random weights (timings on machines without the model files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5,
                                        tie_word_embeddings=True))


def smollm2_for_timing(random_weights: bool):
    """(model, name): the default model, or its architecture with random weights where its files are absent."""
    if random_weights:
        return random_smollm2(), "SmolLM2-135M architecture (random weights)"
    from ccmem.models import load_model

    return load_model()[0], "SmolLM2-135M-Instruct"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(name: str, command: str, headline: dict, config: dict, rows: list[dict], table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"name": name, "command": command, "headline": headline, "environment": environment(),
           "config": config, "rows": rows}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    return path
