"""Run under torchrun by test_dist.py: train a tiny trial and write rank 0's per-step losses to a JSON file."""

import json
import sys

import torch

from harness.data import DataConfig, prepare
from harness.trial.dist import init_distributed, shutdown
from harness.trial.loop import Trainer
from tests.harness.trial.test_loop import make_spec

corpus, cache, out, variant, optimizer, grad_accum = sys.argv[1:7]
torch.set_num_threads(1)
info = init_distributed()
data = prepare(DataConfig(corpus=f"text:{corpus}", tokenizer="byte", cache_dir=cache))
spec = make_spec(
    variant, optimizer, steps=5, grad_accum=int(grad_accum), micro_batch_size=2, grad_clip=1.0, eval_interval=100
)
trainer = Trainer(spec, data, __import__("pathlib").Path(out).parent / f"rank{info.rank}", None, info)
trainer.train()
if info.is_main:
    params = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    with open(out, "w") as f:
        json.dump({"losses": trainer.state.losses, "params": params}, f)
shutdown()
