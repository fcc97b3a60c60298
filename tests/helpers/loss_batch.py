"""A random batch of the tensors the per-sample losses take, and the gradient of a loss with respect to v
(the loss tests of advantageflow.py and diffusion_nft.py)."""

import torch


def loss_batch(b=6, seed=0):
    """v (requires grad), v_old, v_ref, x0, x_t: (b, 3, 4, 4) standard normal; sigma in [0.05, 0.95]; adv in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(b, 3, 4, 4, generator=g)  # noqa: E731
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    return dict(v=r().requires_grad_(), v_old=r(), v_ref=r(), x0=r(), x_t=r(), sigma=sigma,
                adv=torch.rand(b, generator=g) * 2 - 1)


def grad_v(loss_fn, batch):
    """d sum(loss_fn(v)) / dv at the batch's v."""
    v = batch["v"].detach().clone().requires_grad_()
    loss_fn(v).sum().backward()
    return v.grad
