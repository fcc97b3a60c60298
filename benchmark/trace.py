"""Run a method script unchanged and record what it cost (used by benchmark/run.py).

    python benchmark/trace.py RECORD.json [--calls] advantageflow.py --num-iterations 4 ...

Writes RECORD.json with the process's peak resident memory and, with --calls, every transformer forward pass
made inside the training loop (input shapes, and whether it ran with gradients, i.e. is followed by a backward),
so that benchmark/run.py can time the same passes alone ("pure model compute"). Each pass is tagged "sample" if
it came before the iteration's reward call and "train" after it. "Inside the training loop" =
between the first and the last item of the script's tqdm progress bar over iterations; run with an
--eval-every larger than --num-iterations so that no evaluation falls inside it.
"""

import json
import resource
import runpy
import sys

from pathlib import Path

import torch
import tqdm
from diffusers import SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.rewards import RewardFn
from common import reward_models, world  # noqa: E402,F401 (they register the real rewards and the embedded world)

record_path, argv = sys.argv[1], sys.argv[2:]
trace = argv[0] == "--calls"
argv = argv[1:] if trace else argv
state = dict(in_loop=False, phase="sample", iterations=0, calls=[])

if trace:
    forward, iterate, score = SD3Transformer2DModel.forward, tqdm.tqdm.__iter__, RewardFn.__call__

    def traced_forward(self, hidden_states=None, encoder_hidden_states=None, pooled_projections=None,
                       timestep=None, **kw):
        if state["in_loop"]:
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            state["calls"].append([list(hidden_states.shape), list(encoder_hidden_states.shape),
                                   list(pooled_projections.shape), grad, state["phase"]])
        return forward(self, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                       pooled_projections=pooled_projections, timestep=timestep, **kw)

    def traced_iter(self):
        for x in iterate(self):
            state["in_loop"], state["phase"] = True, "sample"
            state["iterations"] += 1
            yield x
        state["in_loop"] = False

    def traced_score(self, *a, **kw):
        out = score(self, *a, **kw)
        state["phase"] = "train"
        return out

    SD3Transformer2DModel.forward, tqdm.tqdm.__iter__, RewardFn.__call__ = traced_forward, traced_iter, traced_score

sys.argv = argv
try:
    runpy.run_path(argv[0], run_name="__main__")
finally:
    state["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(record_path, "w") as f:
        json.dump(state, f)
