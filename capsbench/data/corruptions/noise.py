"""Pixel noise corruptions of MNIST-C (Mu & Gilmer 2019): shot (Poisson) and impulse (salt and pepper)."""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.data.corruptions.registry import corruption
from capsbench.data.corruptions.rng import uniform

SHOT_RATE = 3.0  # photons per unit intensity (severity 5 of the reference)
IMPULSE_AMOUNT = 0.17  # fraction of pixels replaced (severity 4)


def poisson_cdf(lam: Tensor, kmax: int) -> Tensor:
    """(kmax + 1, *lam.shape) P(K <= k) for k = 0..kmax, K ~ Poisson(lam)."""
    terms = [torch.exp(-lam)]
    for k in range(1, kmax + 1):
        terms.append(terms[-1] * lam / k)
    return torch.stack(terms).cumsum(0)


@corruption("shot_noise", "Poisson noise: poisson(3 x) / 3, clipped to [0, 1]")
def shot_noise(x: Tensor, seed: int, start: int) -> Tensor:
    """Poisson(3 x) / 3 by inverse-CDF sampling from one uniform per pixel: counts above 3 all clip
    to 1, so the CDF up to k = 2 decides the result exactly."""
    c = int(SHOT_RATE)
    u = uniform(seed, "shot_noise", start, len(x), tuple(x.shape[1:]), x.device).to(x.dtype)  # (B, 1, 28, 28)
    cdf = poisson_cdf(x * SHOT_RATE, c - 1)  # (c, B, 1, 28, 28)
    counts = (u.unsqueeze(0) >= cdf).sum(0)  # min(K, c): how many of P(K <= 0..c-1) u passes
    return (counts.to(x.dtype) / SHOT_RATE).clamp(0, 1)


@corruption("impulse_noise", "salt and pepper noise: 17% of pixels set to 0 or 1 (half each)")
def impulse_noise(x: Tensor, seed: int, start: int) -> Tensor:
    """skimage ``random_noise(mode="s&p", amount=0.17)``: each pixel flipped with p = 0.17, to 1 or 0
    with p = 0.5 each."""
    u = uniform(seed, "impulse_noise", start, len(x), (2, *x.shape[1:]), x.device).to(x.dtype)  # (B, 2, 1, 28, 28)
    flipped, salt = u[:, 0] < IMPULSE_AMOUNT, u[:, 1] < 0.5
    out = torch.where(flipped & salt, torch.ones_like(x), x)
    return torch.where(flipped & ~salt, torch.zeros_like(x), out)

