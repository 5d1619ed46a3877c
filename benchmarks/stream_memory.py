"""Bounded memory while streaming: peak resident memory of a process that streams 10k vs 100k tokens of the KJV
New Testament through CCM (SmolLM2-135M + adapters/stream-kjv). Each length runs in its own process.
Writes benchmarks/results/stream_memory.{json,md}. Headline: peak(100k) / peak(10k), target <= 1.05.
Run: python benchmarks/stream_memory.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_results  # noqa: E402

CHILD = """
import resource, sys, time
from ccmem.model import CompressedModel
from ccmem.models import load_model
from ccmem.streaming import Streamer, load_stream_tokens
model, tok = load_model()
ccm = CompressedModel.from_pretrained("adapters/stream-kjv", model, tokenizer=tok)
ids = load_stream_tokens(tok, "kjv:new", 0, int(sys.argv[1]))
t0 = time.time()
r = Streamer(ccm, "ccm").run(ids)
print(len(ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, r.ppl, max(r.cache_sizes), time.time() - t0)
"""


def main() -> None:
    rows = []
    for n in (10_000, 100_000):
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
        tokens, peak_kib, ppl, slots, secs = out.stdout.split()[-5:]
        rows.append({"tokens": int(tokens), "peak_rss_mib": int(peak_kib) / 1024, "ppl": float(ppl),
                     "max_cache_slots": int(slots), "seconds": float(secs)})
        print(rows[-1], flush=True)
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    headline = {"metric": "peak_rss_100k_over_10k", "value": round(ratio, 4), "target": 1.05,
                "higher_is_better": False, "unit": "x",
                "meaning": "peak resident memory of a process streaming 100k tokens / one streaming 10k tokens "
                           "(CCM, SmolLM2-135M, window 160, <= 8 memory slots)"}
    table = (f"# Streaming memory stays bounded\n\nHeadline: {headline['metric']} = {headline['value']} "
             f"(target <= {headline['target']})\n\n" + markdown_table(rows, list(rows[0])))
    write_results("stream_memory", "python benchmarks/stream_memory.py", headline,
                  {"adapter": "adapters/stream-kjv", "text": "kjv:new from token 0", "window": 160, "chunk": 64,
                   "mem_slots": 8}, rows, table)
    print(table)


if __name__ == "__main__":
    main()
