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

Under bf16 autocast on a CPU (training where the CPU multiplies bf16 natively) Conv1, the
forward transforms and the products run in bf16 with fp32 accumulation, about twice as fast;
the output then rounds like autocast's own bf16 convolution (about 0.5% of its norm).
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


def _angles(freqs: list[tuple[int, int]], size: int, n: int) -> Tensor:
    """(len(freqs), size^2): 2 pi (k1 m + k2 q) / n over a size x size grid (m, q)."""
    k1, k2 = (torch.tensor(col, dtype=torch.float64) for col in zip(*freqs))
    m, q = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")  # fmt: skip
    return 2 * math.pi * (k1[:, None] * m.flatten() + k2[:, None] * q.flatten()) / n


def row_plan(n: int) -> list[list[tuple[int, int, str]]]:
    """The spectral rows, grouped in n/2 blocks of 3n: (k1, k2, kind) with kind "k1", "k2", "k3"
    (Gauss's three products of a complex frequency), "re" (a real, self-conjugate frequency:
    one product) or "zero" (padding, so every block has the same size). Block j < n/2 - 1
    holds column frequency k2 = j + 1 (all n k1); the last holds k2 = 0 and n/2 (k1 <= n/2)."""
    by_column: dict[int, list[tuple[int, int, str]]] = {k2: [] for k2 in range(n // 2 + 1)}
    for k1, k2, mult in frequencies(n):
        by_column[k2] += [(k1, k2, "re")] if mult == 1 else [(k1, k2, kind) for kind in ("k1", "k2", "k3")]
    edge = by_column[0] + by_column[n // 2]
    return [by_column[k2] for k2 in range(1, n // 2)] + [edge + [(0, 0, "zero")] * (3 * n - len(edge))]


@lru_cache(maxsize=None)
def transforms64(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(S1 (n, n), S2 (n/2, 3n, 2n), T_w (R, TAPS^2), U ((n-TAPS+1)^2, R)) in float64, for the
    R = 1.5 n^2 rows of ``row_plan(n)``.

    The input transform is separable: S1 is a real DFT along q (rows Re/Im of k2 = 1..n/2-1,
    then Re of k2 = 0 and n/2), applied to every m; block j of S2 maps its pair of S1 rows
    (x n values of m) to its 3n rows. Rows give, per complex frequency f, Re X_f + Im X_f,
    Re X_f and Im X_f (Re X_f for a real one); rows of T_w give Re V_f, Im V_f - Re V_f and
    Re V_f + Im V_f (Re V_f) for V_f = conj(W_f) (a cross-correlation); products of matching
    rows are Gauss's k1, k2, k3 (Y_f), and U maps them to the valid outputs: Re Y = k1 - k3,
    Im Y = k1 + k2, y = sum_f mult_f Re(Y_f e^{i phi}) / n^2 (mult 2 for a conjugate pair)."""
    rows = [r for block in row_plan(n) for r in block]
    freqs = [(k1, k2) for k1, k2, _ in rows]
    tx, tw, phi = _angles(freqs, n, n), _angles(freqs, TAPS, n), _angles(freqs, n - TAPS + 1, n)
    xr, xi = torch.cos(tx), -torch.sin(tx)  # X_f = sum x e^{-i theta}
    wr, wi = torch.cos(tw), torch.sin(tw)  # conj(W_f) = sum w e^{+i theta}
    ur, ui = torch.cos(phi) / n**2, -torch.sin(phi) / n**2  # y = ur Re Y + ui Im Y (per unit mult)
    t_x, t_w, u = torch.zeros_like(xr), torch.zeros_like(wr), torch.zeros_like(ur)
    for i, (_, _, kind) in enumerate(rows):
        if kind == "re":
            t_x[i], t_w[i], u[i] = xr[i], wr[i], ur[i]
        elif kind != "zero":
            j = "k1 k2 k3".split().index(kind)
            t_x[i] = (xr[i] + xi[i], xr[i], xi[i])[j]
            t_w[i] = (wr[i], wi[i] - wr[i], wr[i] + wi[i])[j]
            u[i] = 2 * (ur[i] + ui[i], ui[i], -ur[i])[j]
    s1, s2 = _separable(t_x, n)
    return s1, s2, t_w, u.T.contiguous()


def _separable(t_x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """S1 and S2 with S2[j] @ (S1 applied along q)[block j rows] == t_x[block j] over (m, q)."""
    q = torch.arange(n, dtype=torch.float64)
    s1 = []
    for k2 in range(1, n // 2):
        s1 += [torch.cos(2 * math.pi * k2 * q / n), -torch.sin(2 * math.pi * k2 * q / n)]
    s1 += [torch.ones(n, dtype=torch.float64), torch.cos(math.pi * q)]
    s1 = torch.stack(s1)  # (n, n): rows r, columns q
    eye = torch.eye(n, dtype=torch.float64)
    s2 = []
    for j, rows in enumerate(t_x.split(3 * n)):
        # Z rows of block j, as functionals of x over (m, q): Z[(r, m)] = sum_q S1[r, q] x[m, q]
        z = torch.einsum("rq,mk->rmkq", s1[2 * j : 2 * j + 2], eye).reshape(2 * n, n * n)
        s2.append(torch.linalg.lstsq(z.T, rows.T).solution.T)  # (3n, 2n); exact: rows lie in z's span
        assert torch.allclose(s2[-1] @ z, rows, atol=1e-10), "spectral transform is not separable"
    return s1, torch.stack(s2)


@torch.compiler.assume_constant_result
def transforms(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """transforms64(n) on ``device`` in ``dtype``, converted once per (n, device, dtype). Under
    torch.compile the result is a constant of the graph: the construction (lstsq, Python loops)
    is never traced, and a cached function would be traced through its cache."""
    return _converted(n, device, dtype)


@lru_cache(maxsize=None)
def _converted(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(t.to(device=device, dtype=dtype) for t in transforms64(n))  # type: ignore[return-value]


def phase_side(input_size: int, conv1_kernel: int = KERNEL) -> int:
    """Side n of one input phase of PrimaryCaps: half of Conv1's (valid) output side."""
    return (input_size - conv1_kernel + 1) // 2


def supports(conv1_out: int, kernel: int, stride: int) -> bool:
    """Whether a PrimaryCaps layer of this shape can take the spectral path."""
    return conv1_out % 2 == 0 and conv1_out // 2 >= TAPS and kernel == KERNEL and stride == 2


def weight_spectra(weight: Tensor, n: int) -> Tensor:
    """PrimaryCaps weight (O, C, 9, 9) -> (R, 4C, O) for n x n phases: the kernel spectra of
    ``row_plan(n)``'s rows, contraction index (phase a, phase e, channel)."""
    O, C = weight.shape[:2]
    t_w = transforms(n, weight.device, weight.dtype)[2]
    wp = _TapsMajor.apply(F.pad(weight, (0, 1, 0, 1)))  # zero-padded to 10x10, (p, q, a, e, c, o)
    with torch.autocast(weight.device.type, enabled=False):
        return (t_w @ wp.view(TAPS**2, 4 * C * O)).view(t_w.shape[0], 4 * C, O)


class _TapsMajor(torch.autograd.Function):
    """(O, C, 10, 10) [o, c, (p, a), (q, e)] -> (p, q, a, e, c, o), contiguous, and back for the
    gradient: a 2-D transpose (o to the inside) then a permute that moves 1 KB rows, about 2x
    faster than one 6-D permute copy, which strides through memory for every element."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:  # type: ignore[override]
        O, C = w.shape[:2]
        rows = w.reshape(O, C * 4 * TAPS**2).t().contiguous()  # (c p a q e, o)
        return rows.view(C, TAPS, 2, TAPS, 2, O).permute(1, 3, 2, 4, 0, 5).contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        *_, C, O = g.shape
        rows = g.permute(4, 0, 2, 1, 3, 5).contiguous()  # (c, p, a, q, e, o)
        return rows.view(C * 4 * TAPS**2, O).t().contiguous().view(O, C, 2 * TAPS, 2 * TAPS)


def product_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the transforms and products for input x: bf16 under CPU bf16 autocast (where the
    CPU multiplies bf16 natively, about twice as fast; the output's rounding is then that of a
    bf16 convolution, about 0.5% of its norm), else x's own dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
        return torch.bfloat16
    return x.dtype


def spectral_primary(x: Tensor, conv1: torch.nn.Conv2d, primary: torch.nn.Conv2d,
                     spectra: Tensor | None = None) -> Tensor:  # fmt: skip
    """``primary(relu(conv1(x)))`` for x (B, Cin, S, S): (B, O, G, G) as a view of a (G, G, B, O)
    tensor. ``spectra`` may pass weight_spectra(primary.weight, n) computed before. Runs with
    autocast off: Conv1, the forward transforms and the products in ``product_dtype(x)`` (x's
    dtype unless under bf16 autocast), the inverse transform and the output in x's dtype."""
    low = product_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _spectral_primary(x, conv1, primary, spectra, low)


def _spectral_primary(x: Tensor, conv1: torch.nn.Conv2d, primary: torch.nn.Conv2d, spectra: Tensor | None,
                      low: torch.dtype) -> Tensor:  # fmt: skip
    B, cin, S, _ = x.shape
    k1 = conv1.kernel_size[0]
    n = phase_side(S, k1)
    C, O, G = conv1.out_channels, primary.out_channels, n - TAPS + 1
    s1, s2, _, _ = transforms(n, x.device, low)
    u = transforms(n, x.device, x.dtype)[3]
    # Conv1 as one GEMM; patch rows ordered (q, m, b, a, e) so that its output (rows x C) is
    # the (pixel, image x phase x channel) matrix the transform reads, with no transpose.
    cols = F.unfold(x.to(low), k1)  # (B, Cin*k1*k1, 2n*2n) [b, k, (m, a, q, e)]
    K = cols.shape[1]
    cols = cols.view(B, K, n, 2, n, 2).permute(4, 2, 0, 3, 5, 1).reshape(-1, K)
    h = torch.addmm(conv1.bias.to(low), cols, conv1.weight.to(low).view(C, K).t()).relu_()  # (n*n*B*4, C)
    z = s1 @ h.view(n, n * B * 4 * C)  # DFT along q: (n rows, n values of m, B*4C)
    X = torch.bmm(s2, z.view(n // 2, 2 * n, B * 4 * C)).view(-1, B, 4 * C)  # along m: (R, B, 4C)
    V = weight_spectra(primary.weight.to(low), n) if spectra is None else spectra  # (R, 4C, O)
    Y = torch.bmm(X, V.to(low)).to(x.dtype)  # (R, B, O): Gauss's k1, k2, k3 per frequency
    y = (u @ Y.view(Y.shape[0], B * O)).view(G, G, B, O) + primary.bias.to(x.dtype)  # (G, G, B, O)
    return y.permute(2, 3, 0, 1)
