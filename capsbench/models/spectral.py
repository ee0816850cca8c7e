"""CapsNet's Conv1 + PrimaryCaps convolutions with PrimaryCaps in the frequency domain: the same
function as ``F.conv2d`` twice, with about a quarter of the multiply-adds (for CPUs, where
these convolutions are compute-bound and cuDNN's kernels are not available).

PrimaryCaps is a 9x9 stride-2 convolution. It splits into four stride-1 convolutions, one per
input phase ``(a, e)``: pixels ``(2m + a, 2n + e)`` against kernel taps ``(2p + a, 2q + e)``.
On an even Conv1 output of side 2N (20 for MNIST's 28x28) each phase is N x N and each phase
kernel at most 5x5, so the N - 4 valid outputs per axis are exactly an N-point circular
cross-correlation: no padding, no wrap-around. In the N x N frequency domain a
cross-correlation is a product per frequency, so the sum over ``channels x 4 phases`` becomes
one complex (B x 4C) @ (4C x O) matrix product per frequency. A real N x N signal is fixed by
about half its N^2 frequencies (52 of 100 at N = 10; the rest are complex conjugates), and each
complex product takes three real ones (Gauss's trick). At 28x28 the layer costs
52 x 3 x 1024 x 256 = 41M multiply-adds per image instead of 36 x 256 x 256 x 81 = 191M.

Conv1 is computed as one GEMM whose rows come out in the order the transform reads them, so no
large tensor is transposed. The transforms are small dense real matrices applied as GEMMs, so
autograd differentiates everything exactly; no complex dtype or FFT library is involved.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

TAPS = 5  # taps per phase and axis of a 9x9 kernel (phase 1 has 4, zero-padded)
KERNEL = 2 * TAPS - 1


def frequencies(n: int) -> list[tuple[int, int, int]]:
    """The frequencies (k1, k2) that determine a real n x n spectrum (n even), each with its
    multiplicity in the inverse transform: 1 if self-conjugate, 2 if it stands for a pair."""
    out = []
    for k2 in range(n // 2 + 1):
        edge = k2 in (0, n // 2)  # columns that are their own conjugates: keep k1 <= n/2
        for k1 in range(n // 2 + 1 if edge else n):
            out.append((k1, k2, 1 if edge and k1 in (0, n // 2) else 2))
    return out


@lru_cache(maxsize=None)
def transforms64(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(T_x (3F, n*n), T_w (3F, TAPS^2), U ((n-TAPS+1)^2, 3F)) in float64.

    Rows of T_x give, per frequency f, Re X_f + Im X_f, Re X_f and Im X_f; rows of T_w give
    Re V_f, Im V_f - Re V_f and Re V_f + Im V_f for V_f = conj(W_f) (a cross-correlation);
    products of matching rows are Gauss's k1, k2, k3, and U maps them to the valid outputs:
    Re Y = k1 - k3, Im Y = k1 + k2, y = sum_f mult_f Re(Y_f e^{i phi}) / n^2."""
    freqs = frequencies(n)
    k1, k2, mult = (torch.tensor(col, dtype=torch.float64) for col in zip(*freqs))

    def angles(size: int) -> Tensor:  # (F, size^2): 2 pi (k1 m + k2 q) / n over a size x size grid
        m, q = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                              indexing="ij")  # fmt: skip
        return 2 * math.pi * (k1[:, None] * m.flatten() + k2[:, None] * q.flatten()) / n

    tx = angles(n)
    xr, xi = torch.cos(tx), -torch.sin(tx)  # X_f = sum x e^{-i theta}
    t_x = torch.cat([xr + xi, xr, xi])
    tw = angles(TAPS)
    wr, wi = torch.cos(tw), torch.sin(tw)  # conj(W_f) = sum w e^{+i theta}
    t_w = torch.cat([wr, wi - wr, wr + wi])
    phi = angles(n - TAPS + 1).T  # (outputs, F)
    ur, ui = torch.cos(phi) * mult / n**2, -torch.sin(phi) * mult / n**2  # y = ur Re Y + ui Im Y
    u = torch.cat([ur + ui, ui, -ur], dim=1)  # applied to (k1, k2, k3)
    return t_x, t_w, u


@lru_cache(maxsize=None)
def transforms(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """transforms64(n) on ``device`` in ``dtype``, converted once per (n, device, dtype)."""
    return tuple(t.to(device=device, dtype=dtype) for t in transforms64(n))  # type: ignore[return-value]


def phase_side(input_size: int, conv1_kernel: int = KERNEL) -> int:
    """Side n of one input phase of PrimaryCaps: half of Conv1's (valid) output side."""
    return (input_size - conv1_kernel + 1) // 2


def supports(conv1_out: int, kernel: int, stride: int) -> bool:
    """Whether a PrimaryCaps layer of this shape can take the spectral path."""
    return conv1_out % 2 == 0 and conv1_out // 2 >= TAPS and kernel == KERNEL and stride == 2


def weight_spectra(weight: Tensor, n: int) -> Tensor:
    """PrimaryCaps weight (O, C, 9, 9) -> (3F, 4C, O) for n x n phases: Gauss's three real
    kernel spectra per frequency, contraction index (phase a, phase e, channel)."""
    O, C = weight.shape[:2]
    t_w = transforms(n, weight.device, weight.dtype)[1]
    # zero-padded to 10x10: [o, c, p, a, q, e] -> (p, q, a, e, c, o)
    wp = F.pad(weight, (0, 1, 0, 1)).view(O, C, TAPS, 2, TAPS, 2).permute(2, 4, 3, 5, 1, 0)
    with torch.autocast(weight.device.type, enabled=False):
        return (t_w @ wp.reshape(TAPS**2, 4 * C * O)).view(t_w.shape[0], 4 * C, O)


def spectral_primary(x: Tensor, conv1: torch.nn.Conv2d, primary: torch.nn.Conv2d,
                     spectra: Tensor | None = None) -> Tensor:  # fmt: skip
    """``primary(relu(conv1(x)))`` for x (B, Cin, S, S): (B, O, G, G) as a view of a (G, G, B, O)
    tensor. ``spectra`` may pass weight_spectra(primary.weight, n) computed before. Runs in
    the input's dtype with autocast off (the transforms are exact only in full precision)."""
    with torch.autocast(x.device.type, enabled=False):
        return _spectral_primary(x, conv1, primary, spectra)


def _spectral_primary(x: Tensor, conv1: torch.nn.Conv2d, primary: torch.nn.Conv2d, spectra: Tensor | None) -> Tensor:
    B, cin, S, _ = x.shape
    k1 = conv1.kernel_size[0]
    n = phase_side(S, k1)
    C, O, G = conv1.out_channels, primary.out_channels, n - TAPS + 1
    t_x, _, u = transforms(n, x.device, x.dtype)
    # Conv1 as one GEMM; patch rows ordered (m, n, b, a, e) so that its output (rows x C) is
    # the (pixel, image x phase x channel) matrix the transform reads, with no transpose.
    cols = F.unfold(x, k1)  # (B, Cin*k1*k1, 2n*2n) [b, k, (m, a, n, e)]
    K = cols.shape[1]
    cols = cols.view(B, K, n, 2, n, 2).permute(2, 4, 0, 3, 5, 1).reshape(-1, K)
    h = torch.addmm(conv1.bias.to(x.dtype), cols, conv1.weight.to(x.dtype).view(C, K).t()).relu_()  # (n*n*B*4, C)
    X = (t_x @ h.view(n * n, B * 4 * C)).view(-1, B, 4 * C)  # (3F, B, 4C)
    V = weight_spectra(primary.weight.to(x.dtype), n) if spectra is None else spectra  # (3F, 4C, O)
    Y = torch.bmm(X, V)  # (3F, B, O): Gauss's k1, k2, k3 per frequency
    y = (u @ Y.view(Y.shape[0], B * O)).view(G, G, B, O) + primary.bias.to(x.dtype)  # (G, G, B, O)
    return y.permute(2, 3, 0, 1)
