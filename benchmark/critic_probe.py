"""Can AC-Flow's critic learn the value of intermediate states on the embedded world? An offline probe.

Samples pools of base-model images (CFG-free 10-step Euler, as acflow.py rolls out), scores them once, then trains
critics of acflow.py's architecture on the shaped (z-scored) terminal reward and reports the explained variance on a
fresh pool never trained on, overall and per noise level, for each input:
  xt        the noised point x_t alone (acflow.py's critic)
  xt_x0hat  x_t and the frozen model's clean-image estimate x0_hat = x_t - sigma * v(x_t)
  prompt    the pooled prompt only (latents zeroed): what the prompt alone explains
  feat      the frozen model's last hidden states at x_t (mean and max over image tokens), an MLP head
and for two kinds of states: interp (x_t = (1 - sigma) x0 + sigma * eps with fresh eps, the points the actor trains
on) and traj (the sampler's own ODE states x_{sigma_i} along each trajectory).

    python benchmark/critic_probe.py --threads 1                  # 320 training images, ~10 min on one core
    python benchmark/critic_probe.py --train-batches 30 --inputs feat xt_x0hat   # 960 training images
"""

import json
from dataclasses import dataclass

import torch
import tyro

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import acflow  # noqa: E402
from common import models, rewards, sampling, utils  # noqa: E402
from common import reward_models, world  # noqa: E402,F401 (they register the real rewards and the embedded world)


@dataclass
class Args:
    train_batches: int = 10
    """pool batches of 32 images to train on (acflow.py keeps 2 pools of 5 x 32)"""
    test_batches: int = 5
    steps: int = 800
    """critic steps (acflow.py default run: 100 iterations x 8)"""
    lr: float = 1e-3
    width: int = 32
    seed: int = 0
    threads: int = 1
    json: str | None = None
    inputs: tuple[str, ...] = ("feat", "prompt", "xt", "xt_x0hat")


def main(a):
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = models.load_model("embedded", "cpu")
    prompts, meta = utils.load_prompts(None)
    sampler = utils.PromptSampler(prompts, meta, 16, 2, a.seed)
    reward_fn = rewards.build_reward("shapes", "cpu")
    sigmas = model.sigmas(10)
    ref = model.transformer.eval()

    def pool(batches, offset):
        out = dict(x0=[], traj=[], x0hat=[], pe=[], pooled=[], r=[])
        for b in range(batches):
            caps, m, _ = sampler.sample(offset + b)
            pe, pp = model.encode_prompt(caps)
            noise = torch.randn(len(caps), *model.latent_shape, generator=torch.Generator().manual_seed(offset + b))
            with torch.no_grad():
                res = sampling.sample(ref, pe, pp, sigmas, noise, return_trajectory=True)
                traj = res["trajectory"][:, :-1]  # (B, T, C, H, W): the states the sampler's steps start from
                v = [sampling.predict(ref, traj[:, i], sigmas[i].expand(len(caps)), pe, pp)
                     for i in range(len(sigmas) - 1)]
                hats = torch.stack([traj[:, i] - sigmas[i] * v[i] for i in range(len(v))], 1)  # clean estimates
            r, _ = reward_fn(model.decode(res["latents"]), caps, m)
            out["x0"].append(res["latents"]), out["traj"].append(traj), out["x0hat"].append(hats)
            out["pe"].append(pe), out["pooled"].append(pp), out["r"].append(r.float())
        return {k: torch.cat(v) for k, v in out.items()}

    train, test = pool(a.train_batches, 0), pool(a.test_batches, 10_000)
    captured = {}
    ref.norm_out.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    mu, sd = train["r"].mean(), train["r"].std(unbiased=False)
    train["z"], test["z"] = (train["r"] - mu) / sd, (test["r"] - mu) / sd

    def points(p, idx, kind, gen, x0hat_needed):
        n = len(idx)
        if kind == "interp":
            s = torch.rand(n, generator=gen)
            eps = torch.randn(n, *model.latent_shape, generator=gen)
            xt = (1 - s.view(-1, 1, 1, 1)) * p["x0"][idx] + s.view(-1, 1, 1, 1) * eps
            hat = None
            if x0hat_needed:
                with torch.no_grad():
                    hat = xt - s.view(-1, 1, 1, 1) * sampling.predict(ref, xt, s, p["pe"][idx], p["pooled"][idx])
            return s, xt, hat
        i = torch.randint(len(sigmas) - 1, (n,), generator=gen)
        return sigmas[i], p["traj"][idx, i], p["x0hat"][idx, i]

    def feat_points(p, reps, gen):  # fixed noised points (features need a transformer forward each)
        out = dict(s=[], f=[], z=[], pooled=[])
        for _ in range(reps):
            for idx in torch.arange(len(p["r"])).split(64):
                s = torch.rand(len(idx), generator=gen)
                eps = torch.randn(len(idx), *model.latent_shape, generator=gen)
                xt = (1 - s.view(-1, 1, 1, 1)) * p["x0"][idx] + s.view(-1, 1, 1, 1) * eps
                with torch.no_grad():
                    sampling.predict(ref, xt, s, p["pe"][idx], p["pooled"][idx])
                h = captured["h"]
                out["s"].append(s), out["f"].append(torch.cat([h.mean(1), h.amax(1)], -1))
                out["z"].append(p["z"][idx]), out["pooled"].append(p["pooled"][idx])
        return {k: torch.cat(v) for k, v in out.items()}

    results = {}
    if "feat" in a.inputs:
        gen = torch.Generator().manual_seed(a.seed)
        ftr, fte = feat_points(train, 8, gen), feat_points(test, 4, gen)
        torch.manual_seed(a.seed)
        d = ftr["f"].shape[1]
        head = torch.nn.Sequential(torch.nn.Linear(d + 1 + ftr["pooled"].shape[1], 128), torch.nn.LayerNorm(128),
                                   torch.nn.SiLU(), torch.nn.Linear(128, 1))
        opt = torch.optim.AdamW(head.parameters(), lr=a.lr, weight_decay=1e-4)
        cat = lambda q: torch.cat([q["f"], q["s"][:, None], q["pooled"]], -1)  # noqa: E731
        for _ in range(a.steps):
            idx = torch.randint(len(ftr["z"]), (32,), generator=gen)
            loss = ((head(cat(ftr)[idx]).squeeze(-1) - ftr["z"][idx]) ** 2).mean()
            opt.zero_grad(), loss.backward(), opt.step()
        with torch.no_grad():
            v = head(cat(fte)).squeeze(-1)
        s, t = fte["s"], fte["z"]
        row = {"all": acflow.explained_variance(v, t)}
        for name, lo, hi in (("sigma<0.3", 0, 0.3), ("0.3-0.7", 0.3, 0.7), ("sigma>0.7", 0.7, 1.01)):
            m = (s >= lo) & (s < hi)
            row[name] = acflow.explained_variance(v[m], t[m])
        results["feat/interp"] = row
        print("feat      interp " + "  ".join(f"{k} {x:+.3f}" for k, x in row.items()), flush=True)
    for inp in [i for i in ("prompt", "xt", "xt_x0hat") if i in a.inputs]:
        for kind in ("interp", "traj"):
            torch.manual_seed(a.seed)
            ch = model.latent_shape[0] * (2 if inp == "xt_x0hat" else 1)
            critic = acflow.Critic(ch, model.transformer.config.pooled_projection_dim, a.width, zero_init=False)
            opt = torch.optim.AdamW(critic.parameters(), lr=a.lr, weight_decay=1e-4)
            gen = torch.Generator().manual_seed(a.seed)

            def feats(p, idx):
                s, xt, hat = points(p, idx, kind, gen, inp == "xt_x0hat")
                x = torch.zeros_like(xt) if inp == "prompt" else xt
                return critic(torch.cat([x, hat], 1) if inp == "xt_x0hat" else x, s, p["pooled"][idx]), s

            for _ in range(a.steps):
                idx = torch.randint(len(train["r"]), (32,), generator=gen)
                loss = ((feats(train, idx)[0] - train["z"][idx]) ** 2).mean()
                opt.zero_grad(), loss.backward(), opt.step()
            with torch.no_grad():
                preds, ss, ts = [], [], []
                for rep in range(4):  # 4 noised points per test image
                    idx = torch.arange(len(test["r"]))
                    v, s = feats(test, idx)
                    preds.append(v), ss.append(s), ts.append(test["z"])
                v, s, t = torch.cat(preds), torch.cat(ss), torch.cat(ts)
            row = {"all": acflow.explained_variance(v, t)}
            for name, lo, hi in (("sigma<0.3", 0, 0.3), ("0.3-0.7", 0.3, 0.7), ("sigma>0.7", 0.7, 1.01)):
                m = (s >= lo) & (s < hi)
                row[name] = acflow.explained_variance(v[m], t[m]) if m.sum() > 10 else float("nan")
            results[f"{inp}/{kind}"] = row
            print(f"{inp:9s} {kind:6s} " + "  ".join(f"{k} {x:+.3f}" for k, x in row.items()), flush=True)
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main(tyro.cli(Args))
