"""Photometric corruptions of MNIST-C (Mu & Gilmer 2019): brightness, stripe and fog."""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.data.corruptions.registry import corruption
from capsbench.data.corruptions.rng import per_image

BRIGHTNESS = 0.5  # added to HSV value, severity 5; for grey images exactly x + 0.5
FOG_AMOUNT, FOG_DECAY = 3.0, 1.4  # severity 5: (fractal weight, wibble decay)
MAPSIZE = 256  # the plasma fractal's side (the reference crops its top-left 28x28)
FOG_CHUNK = 64  # fractals built at once (each a 256 x 256 float32 map and its draws: 0.5 MiB)
STRIPE = (slice(0, 7), slice(21, 28))  # the inverted columns


@corruption("brightness", "brightness: HSV value + 0.5, i.e. clip(x + 0.5, 0, 1) for grey images")
def brightness(x: Tensor, seed: int, start: int) -> Tensor:
    return (x + BRIGHTNESS).clamp(0, 1)


@corruption("stripe", "invert columns 0-6 and 21-27")
def stripe(x: Tensor, seed: int, start: int) -> Tensor:
    out = x.clone()
    for cols in STRIPE:
        out[..., cols] = 1 - x[..., cols]
    return out


def plasma_draws(g: torch.Generator) -> Tensor:
    """The uniforms one fractal uses: 3 (256/s)^2 per level s = 256..2, 65,535 in all."""
    return torch.rand(MAPSIZE * MAPSIZE - 1, generator=g)


def plasma_fractal(u: Tensor, decay: float = FOG_DECAY) -> Tensor:
    """(B, 256, 256) diamond-square heightmaps in [0, 1] from uniforms u (B, 65535), as the reference's
    ``plasma_fractal`` (wrap-around neighbours by roll; its noise is wibble * U(-wibble, wibble))."""
    B = len(u)
    m = torch.zeros(B, MAPSIZE, MAPSIZE, dtype=u.dtype, device=u.device)
    step, wibble, used = MAPSIZE, 100.0, 0

    def noise(mean: Tensor) -> Tensor:  # mean (B, k, k): the next k*k uniforms -> mean + wibble * U(-w, w)
        nonlocal used
        k = mean.shape[-1]
        v = u[:, used : used + k * k].view(B, k, k)
        used += k * k
        return mean / 4 + wibble * (wibble * (2 * v - 1))

    while step >= 2:
        h = step // 2
        corner = m[:, 0::step, 0::step]  # (B, k, k)
        sq = corner + corner.roll(-1, 1)
        m[:, h::step, h::step] = noise(sq + sq.roll(-1, 2))  # squares
        dr, ul = m[:, h::step, h::step], m[:, 0::step, 0::step]
        m[:, 0::step, h::step] = noise(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))  # diamonds
        m[:, h::step, 0::step] = noise(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step, wibble = h, wibble / decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


@corruption("fog", "fog: x + 3 * plasma fractal (wibble decay 1.4), rescaled by max / (max + 3)")
def fog(x: Tensor, seed: int, start: int) -> Tensor:
    """Each image's fractal is built in float32 on x's device from its own draws, 64 at a time
    (each needs 65,535 uniforms and a 256 x 256 map), and cropped to its top-left 28x28."""
    chunks = [(i, min(FOG_CHUNK, start + len(x) - i)) for i in range(start, start + len(x), FOG_CHUNK)]
    frac = torch.cat([plasma_fractal(per_image(seed, "fog", i, k, plasma_draws).to(x.device))[:, :28, :28]
                      for i, k in chunks])  # fmt: skip
    frac = frac.unsqueeze(1).to(x)  # (B, 1, 28, 28)
    top = x.amax((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return ((x + FOG_AMOUNT * frac) * top / (top + FOG_AMOUNT)).clamp(0, 1)
