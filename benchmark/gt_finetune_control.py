"""Control for the self-training drift of ORW-CFM-W2 / AC-Flow (docs/orw_cfm_w2.md, "What did not behave"):
fine-tune the embedded base with the same optimiser as the method scripts, but on ground-truth renders of the
train prompts instead of the model's own samples, then evaluate on the held-out split.

    python benchmark/gt_finetune_control.py --lr 3e-5 --steps 20 --batch-size 32
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import models  # noqa: E402
from common import reward_models, world  # noqa: E402,F401 (they register the real rewards and the embedded world)
from common.world import shapes  # noqa: E402
from common.evaluate import evaluate_model  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--lr", type=float, default=3e-5)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(a.seed)
rng, gen = random.Random(a.seed), torch.Generator().manual_seed(a.seed)
model = models.load_model("embedded", "cpu")
tr = model.transformer
opt = torch.optim.AdamW(tr.parameters(), lr=a.lr, weight_decay=1e-4)  # the method scripts' optimiser
specs = shapes.split_specs("train")
for step in range(a.steps):
    batch = [rng.choice(specs) for _ in range(a.batch_size)]
    x0 = shapes.render_batch(batch, rng.getrandbits(32)) * 2 - 1  # ground truth, pixels in [-1, 1]
    with torch.no_grad():
        pe, pooled = model.encode_prompt([s["caption"] for s in batch])
    noise, sigma = torch.randn(x0.shape, generator=gen), torch.rand(a.batch_size, generator=gen)  # ORW: U(0, 1)
    s = sigma.view(-1, 1, 1, 1)
    v = tr(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000, encoder_hidden_states=pe,
           pooled_projections=pooled, return_dict=False)[0]
    loss = ((v - (noise - x0)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
    opt.step()
res = evaluate_model(model, tr, shapes.split_specs("test"), samples_per_prompt=8)
print(f"ground-truth fine-tuning, lr {a.lr}, {a.steps} steps of {a.batch_size}: held-out partial "
      f"{res['reward_mean']:.3f}, strict {res['strict_accuracy']:.3f}")
