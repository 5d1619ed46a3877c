"""Run by test_training under torchrun: a few trainer steps, then rank 0 saves the trainable weights and the log.
The data is a two-part mixture (the same episodes in the same order as one list), so the per-part losses are summed
over ranks too."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from test_training import key_task, make_toy_ccm  # noqa: E402

from ccmem.data import Mixture  # noqa: E402
from ccmem.training import TrainConfig, Trainer  # noqa: E402

out, accum = sys.argv[1], int(sys.argv[2])
ccm = make_toy_ccm()
eps = key_task(64, 0)
tr = Trainer(ccm, Mixture([eps[:40], eps[40:]], names=["first", "rest"]),
             TrainConfig(output_dir=out, max_steps=3, batch_size=4, grad_accum=accum, lr=1e-2))
tr.fit()
if tr.acc.is_main_process:
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in ccm.trainable_named_parameters().items()}, f"{out}/weights.pt")
    Path(f"{out}/history.json").write_text(json.dumps(tr.history))
    print("world", tr.acc.num_processes)
tr.close()
