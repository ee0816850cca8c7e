"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018), small configuration.

Conv1 5x5 stride 2 (A channels, ReLU) -> PrimaryCaps 1x1 (B types of 4x4 pose + sigmoid
activation) -> ConvCaps1 K=3 stride 2 (C types) -> ConvCaps2 K=3 stride 1 (D types) -> class
capsules (transforms shared over positions, coordinate addition). Every capsule layer routes by
EM (Procedure 1 of the paper). All convolutions are "valid": grids at 28x28 input 12, 12, 5, 3;
at 40x40 18, 18, 8, 6.

Parameters, layer by layer (in = input channels, E = classes, every pose 4x4 = 16 entries):

- Conv1: 25 in A weights + A biases                         (A=32, in=1:     832)
- PrimaryCaps pose 1x1 conv: A 16B weights + 16B biases     (              16,896)
- PrimaryCaps activation 1x1 conv: A B weights + B biases   (               1,056)
- ConvCaps1: 9 B C transforms of 16 + beta_u, beta_a per type: 144 B C + 2 C   (147,520)
- ConvCaps2: 144 C D + 2 D                                  (             147,520)
- Class capsules: one transform per (type, class): 16 D E + 2 E                (5,140)

Total at A=B=C=D=32, in=1, E=10: **318,964** (318,816 weights and biases + 148 betas). The paper
says "310K" for this configuration; the architecture it describes gives 318,816 without betas,
2.8% more, and no choice of biases or betas reaches 310K, so we take the paper's figure as
rounded loosely. ``param_count`` is the formula; the tests compare it with the module.

Scores are the class activations a in (0, 1): for this model the capsule "lengths" of the
``CapsuleModel`` interface are the activations, so ``attack_scores`` = log(a / (1 - a)), the
activation's logit, and the "margin" attack loss is the margin loss on the activations.
Training uses the paper's spread loss with the margin growing from 0.2 to 0.9 (see
``MatrixCapsNet.objective``).

Choices where the paper is silent, and simplifications (also in docs of each function):
- Inverse temperature: lambda_t = final_lambda (t + 1) / iters, linear over the iterations;
  final_lambda = 0.01 (the value public TF re-implementations use), which leaves the class
  activations unsaturated at initialisation (about 0.5-0.7 on MNIST digits; at 0.1 they saturate).
- The M-step's cost uses the assigned mass relative to the uniform assignment's mass of that
  parent (sum_i R_ij a_i / sum_i R0_ij): the paper's formula with lambda divided by that
  constant and beta_a multiplied by it; without it the cost grows with the number of children
  (288 per window here) and the sigmoid saturates unless lambda is tuned per layer.
- beta_u, beta_a: one pair per output capsule type per layer (the paper: "learned").
- Variance floor VAR_EPS = 1e-4 per pose entry; the E-step in log space.
- Gradients flow through every routing iteration (``inner_routing_grad``; False differentiates
  only the last M-step). The votes' gradient is accumulated in place by hand (``Votes``).
- Each ConvCaps child's assignments are normalised over all its parents: every output type in
  every window that covers it (the windows overlap), not per window.
- ``uniform_votes`` (the vote attack's surrogate): the class layer fits its Gaussians to the
  uniform assignment, one M-step: pose = activation-weighted mean vote, activation from that
  fit's cost. The mean child activation alone would give all classes the same score.
- Coordinate addition: the centre of each ConvCaps2 capsule's receptive field, in pixels
  divided by the input size, added to entries (0, 3) and (1, 3) of its votes (the right-hand
  column of the 4x4 matrix, as the paper says).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.models.base import ModelOutput
from capsbench.models.capsule import CapsuleModel

POSE = 16  # entries of a 4x4 pose matrix
VAR_EPS = 1e-4  # floor on each parent's per-entry variance: log sigma >= -4.6, 1/sigma^2 <= 1e4
MASS_EPS = 1e-6  # keeps the M-step's means finite for a parent nobody assigns to
W_STD = 0.5  # transform init: a vote M W keeps the scale of M (4 terms of variance 0.25 each)
LOG_2PI = math.log(2 * math.pi)
CHUNK_BYTES = {True: 1 << 30, False: 8 << 30}  # (on a CPU?) -> ConvCaps1 vote bytes routed at a time


class Routing(NamedTuple):
    iters: int
    final_lambda: float  # inverse temperature of the last iteration
    inner_grad: bool  # differentiate the assignments R of the iterations before the last


@dataclass(frozen=True)
class MatrixCapsNetConfig:
    input_size: int = opt(28, ge=17)  # 28 (MNIST) or 40 (affNIST canvas); >= 17 leaves a class grid
    in_channels: int = opt(1, ge=1)
    num_classes: int = opt(10, ge=2)
    A: int = opt(32, ge=1)  # Conv1 channels
    B: int = opt(32, ge=1)  # primary capsule types
    C: int = opt(32, ge=1)  # ConvCaps1 capsule types
    D: int = opt(32, ge=1)  # ConvCaps2 capsule types
    routing_iters: int = opt(3, ge=1)
    final_lambda: float = opt(0.01, gt=0, finite=True)  # inverse temperature of the last iteration
    inner_routing_grad: bool = True  # backpropagate through every routing iteration, not just the last M-step
    routing_chunk: int = opt(0, ge=0, in_key=False)  # examples routed at a time; 0: by memory (chunk_size)
    margin_start: float = opt(0.2, ge=0)  # spread-loss margin, grown linearly to margin_end...
    margin_end: float = opt(0.9, ge=0)
    # ...over this many training steps (the paper gives no length; 0: margin_end throughout)
    margin_ramp_steps: int = opt(2000, ge=0)
    m_plus: float = 0.9  # margin loss on the activations (attacks' "margin" loss)
    m_minus: float = 0.1
    lambda_: float = opt(0.5, ge=0)

    @property
    def grids(self) -> tuple[int, int, int]:
        """Grid sides of PrimaryCaps, ConvCaps1, ConvCaps2 (valid convolutions)."""
        g1 = (self.input_size - 5) // 2 + 1
        g2 = (g1 - 3) // 2 + 1
        return g1, g2, g2 - 2


def param_count(cfg: MatrixCapsNetConfig) -> int:
    """The exact parameter count, layer by layer (see the module docstring)."""
    A, B, C, D, E = cfg.A, cfg.B, cfg.C, cfg.D, cfg.num_classes
    conv1 = 25 * cfg.in_channels * A + A
    primary = (A * POSE * B + POSE * B) + (A * B + B)
    caps1 = 9 * B * C * POSE + 2 * C
    caps2 = 9 * C * D * POSE + 2 * D
    classes = D * E * POSE + 2 * E
    return conv1 + primary + caps1 + caps2 + classes


class Votes:
    """Votes and their squares vv (B, P, C, N, 32) of N children for C parents in each of P
    windows, as routing reads them: through ``sums`` (M-step) and ``lin`` (E-step) only. Each
    read's backward adds its outer product into one gradient buffer in place; autograd would
    allocate a vv-sized gradient per read and add them up, and on a CPU allocating these (the
    model's largest tensors, B x 25 x 32 x 288 x 32 in ConvCaps1) costs more than the products."""

    def __init__(self, v: Tensor) -> None:
        """v (B, P, C, N, 4, 4), any strides."""
        self.bank = _Bank()  # what the graph's nodes hold: no reference back to the graph (no cycle)
        self.token = _Source.apply(v, self.bank)  # 0-dim: carries the gradient buffer back to v
        self.shape, self.dtype, self.device = self.bank.vv.shape, self.bank.vv.dtype, self.bank.vv.device

    def sums(self, ra: Tensor) -> Tensor:
        """sum_n ra[..., n] vv[..., n, :] (B, P, C, 32) for weights ra (B, P, C, N)."""
        return _Sums.apply(ra, self.token, self.bank)

    def lin(self, w: Tensor) -> Tensor:
        """vv @ w (B, P, C, N) for w (B, P, C, 32)."""
        return _Lin.apply(w, self.token, self.bank)


class PlainVotes:
    """The same two reads of vv through plain autograd: what torch.compile traces (the custom
    functions above write into a buffer it cannot follow) and what a GPU, with memory to spare
    for the per-read gradients, runs."""

    def __init__(self, v: Tensor) -> None:
        """v (B, P, C, N, 4, 4), any strides."""
        flat = v.flatten(-2)  # (B, P, C, N, 16)
        self.vv = torch.cat([flat, flat * flat], dim=-1)  # (B, P, C, N, 32)
        self.shape, self.dtype, self.device = self.vv.shape, self.vv.dtype, self.vv.device

    def sums(self, ra: Tensor) -> Tensor:
        """sum_n ra[..., n] vv[..., n, :] (B, P, C, 32) for weights ra (B, P, C, N)."""
        return (ra.unsqueeze(-2) @ self.vv).squeeze(-2)

    def lin(self, w: Tensor) -> Tensor:
        """vv @ w (B, P, C, N) for w (B, P, C, 32)."""
        return (self.vv @ w.unsqueeze(-1)).squeeze(-1)


AnyVotes = Union["Votes", PlainVotes]  # what the routing functions read: sums and lin


def make_votes(v: Tensor) -> AnyVotes:
    """``Votes`` (one in-place gradient buffer) on a CPU, ``PlainVotes`` on a GPU and under torch.compile."""
    if v.device.type != "cpu" or torch.compiler.is_compiling():
        return PlainVotes(v)
    return Votes(v)


class _Bank:
    """vv and its gradient buffer, shared by the nodes that read vv."""

    def __init__(self) -> None:
        self.vv = torch.empty(0)
        self.grad: Tensor | None = None

    def accumulate(self, a: Tensor, b: Tensor) -> None:
        """grad += a (..., N) outer b (..., 32)."""
        if self.grad is None:
            self.grad = a.unsqueeze(-1) * b.unsqueeze(-2)
        else:
            self.grad.addcmul_(a.unsqueeze(-1), b.unsqueeze(-2))


class _Source(torch.autograd.Function):
    """Writes vv = [v, v^2] into the Votes object; backward turns its buffer into v's gradient."""

    @staticmethod
    def forward(ctx, v: Tensor, bank: _Bank) -> Tensor:  # type: ignore[override]
        B, P, C, N = v.shape[:4]
        vv = v.new_empty(B, P, C, N, 2 * POSE)
        first = vv[..., :POSE].unflatten(-1, (4, 4))
        first.copy_(v)
        torch.mul(first, first, out=vv[..., POSE:].unflatten(-1, (4, 4)))
        bank.vv, ctx.bank = vv, bank
        return v.new_zeros(())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        bank = ctx.bank
        g, bank.grad = bank.grad, None
        if g is None:
            return None, None
        gv = g[..., POSE:].mul_(bank.vv[..., :POSE]).mul_(2).add_(g[..., :POSE])  # d/dv of [v, v^2]
        return gv.unflatten(-1, (4, 4)), None


class _Sums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ra: Tensor, token: Tensor, bank: _Bank) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(ra)
        ctx.bank = bank
        return (ra.unsqueeze(-2) @ bank.vv).squeeze(-2)  # (B, P, C, 32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (ra,) = ctx.saved_tensors
        ctx.bank.accumulate(ra, g)
        return (ctx.bank.vv @ g.unsqueeze(-1)).squeeze(-1), g.new_zeros(()), None


class _Lin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, token: Tensor, bank: _Bank) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        ctx.bank = bank
        return (bank.vv @ w.unsqueeze(-1)).squeeze(-1)  # (B, P, C, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        ctx.bank.accumulate(g, w)
        return (g.unsqueeze(-2) @ ctx.bank.vv).squeeze(-2), g.new_zeros(()), None


def m_step(vv: AnyVotes, ra: Tensor, beta_u: Tensor, beta_a: Tensor, lam: float,
           unit_mass: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Gaussian fit of each parent to its votes weighted by R_ij a_i, and its activation.

    vv: votes and their squares (B, P, C, N, 32); ra (B, P, C, N): R_ij a_i; betas (C,);
    unit_mass (P, 1) or scalar: a parent's mass under the uniform assignment. Returns the
    activation logit (B, P, C), mean mu (B, P, C, 16) and variance (B, P, C, 16).
    """
    mass = ra.sum(-1)  # (B, P, C)
    moments = vv.sums(ra) / (mass.unsqueeze(-1) + MASS_EPS)  # (B, P, C, 32)
    mu, sq = moments.split(POSE, dim=-1)  # E[V], E[V^2]
    var = (sq - mu * mu).clamp_min(0) + VAR_EPS
    cost = (POSE * beta_u + 0.5 * torch.log(var).sum(-1)) * (mass / unit_mass)  # sum_h cost^h: (B, P, C)
    return lam * (beta_a - cost), mu, var


def e_step_logits(vv: AnyVotes, logit: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log(a_j p_j(V_ij)) (B, P, C, N) in log space, the quadratic expanded so that the votes
    are streamed once: -sum_h (V - mu)^2 / 2 var = sum_h (V mu / var - V^2 / 2 var) - mu^2 / 2 var."""
    inv = 1.0 / var  # (B, P, C, 16)
    lin = vv.lin(torch.cat([mu * inv, -0.5 * inv], dim=-1))  # (B, P, C, N)
    const = -0.5 * ((mu * mu * inv).sum(-1) + torch.log(var).sum(-1) + POSE * LOG_2PI)  # (B, P, C)
    return lin + (F.logsigmoid(logit) + const).unsqueeze(-1)


def em_routing(vv: AnyVotes, a_in: Tensor, r0: Tensor | float, betas: tuple[Tensor, Tensor], iters: int,
               final_lambda: float, normalize: Callable[[Tensor], Tensor], unit_mass: Tensor | float,
               inner_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """EM routing (Procedure 1), each example on its own: every op keeps the batch dimension.

    vv: votes of N children for C parents in each of P windows; a_in (B, P, N); r0 (P, 1, N)
    or a scalar: the uniform initial assignment; ``normalize`` maps log(a_j p_ij) (B, P, C, N)
    to R summing to 1 over each child's parents.
    Returns activations (B, P, C), poses mu (B, P, C, 16) and the R of the last M-step (the
    final E-step is skipped: its R would change nothing returned). The inverse temperature grows
    linearly to ``final_lambda``; ``inner_grad=False`` computes R without a gradient (only the
    last M-step is differentiated: about half the backward's memory traffic).
    """
    B, P, C, N, _ = vv.shape
    R = torch.as_tensor(r0, dtype=vv.dtype, device=vv.device).expand(B, P, C, N)
    for t in range(iters - 1):
        with torch.set_grad_enabled(inner_grad and torch.is_grad_enabled()):
            R = em_iteration(vv, a_in, R, betas, final_lambda * (t + 1) / iters, normalize, unit_mass)
    logit, mu, _ = m_step(vv, R * a_in.unsqueeze(2), *betas, final_lambda, unit_mass)
    return torch.sigmoid(logit), mu, R


def em_iteration(vv: AnyVotes, a_in: Tensor, R: Tensor, betas: tuple[Tensor, Tensor], lam: float,
                 normalize: Callable[[Tensor], Tensor], unit_mass: Tensor | float) -> Tensor:  # fmt: skip
    """One M-step and E-step at inverse temperature ``lam``: the next assignment R (B, P, C, N)."""
    logit, mu, var = m_step(vv, R * a_in.unsqueeze(2), *betas, lam, unit_mass)
    return normalize(e_step_logits(vv, logit, mu, var))


class ConvCaps(nn.Module):
    """K x K convolutional capsule layer (stride s) with EM routing. Each child's assignments are
    normalised over all its parents: every output type at every window that covers it."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int, grid_in: int, routing: Routing) -> None:
        super().__init__()
        self.k, self.stride, self.grid_in, self.n_in, self.routing = k, stride, grid_in, n_in, routing
        self.grid_out = (grid_in - k) // stride + 1
        self.W = nn.Parameter(W_STD * torch.randn(k * k, n_in, n_out, 4, 4))  # (KK, in, out, 4, 4)
        self.beta_u = nn.Parameter(torch.zeros(n_out))
        self.beta_a = nn.Parameter(torch.zeros(n_out))
        idx, cover = self._child_map()
        self.register_buffer("child_index", idx, persistent=False)  # (L, N): child of each vote
        self.register_buffer("cover", cover, persistent=False)  # (n_in * grid_in^2,): windows per child
        r0 = 1.0 / (n_out * cover[idx].unsqueeze(1))  # (L, 1, N): uniform over the child's parents
        self.register_buffer("r0", r0, persistent=False)
        self.register_buffer("unit_mass", r0.sum(-1), persistent=False)  # (L, 1): a parent's uniform mass

    def _child_map(self) -> tuple[Tensor, Tensor]:
        """Index (type, row, col) of the child behind each (window, kernel offset, type) vote, and
        how many windows cover each child (0 for the edge rows a stride-2 window skips)."""
        g, n = self.grid_in, self.n_in
        pos = F.unfold(torch.arange(g * g, dtype=torch.float64).view(1, 1, g, g), self.k, stride=self.stride)
        pos = pos[0].long().t()  # (L, KK)
        idx = (pos.unsqueeze(-1) + g * g * torch.arange(n)).flatten(1)  # (L, KK * n): n = kk * n_in + type
        cover = torch.zeros(n * g * g).index_add_(0, idx.flatten(), torch.ones(idx.numel()))
        return idx, cover

    def votes(self, pose: Tensor) -> AnyVotes:
        """Votes V = M W (B, L, C, N, 4, 4) of the children in each window, from child poses
        (B, n_in, 16, g, g): one batched matmul over the (kernel offset, type) pairs."""
        B, KK, L, n = pose.shape[0], self.k * self.k, self.grid_out**2, self.n_in
        M = F.unfold(pose.flatten(1, 2), self.k, stride=self.stride)  # (B, n * 16 * KK, L)
        M = M.view(B, n, 4, 4, KK, L).permute(4, 1, 0, 5, 2, 3).reshape(KK * n, B * L * 4, 4)  # (qn, bli, j)
        W = self.W.permute(0, 1, 3, 2, 4).reshape(KK * n, 4, -1)  # (qn, j, ck)
        v = torch.bmm(M, W).view(KK, n, B, L, 4, -1, 4)  # (q, n, b, l, i, c, k)
        return make_votes(v.permute(2, 3, 5, 0, 1, 4, 6).flatten(3, 4))  # (B, L, C, N, 4, 4), a view

    def child_activations(self, act: Tensor) -> Tensor:
        """(B, n_in, g, g) -> (B, L, N), children ordered like the votes (kernel offset, type)."""
        B, KK = act.shape[0], self.k * self.k
        a = F.unfold(act, self.k, stride=self.stride).view(B, self.n_in, KK, -1)  # (B, n_in, KK, L)
        return a.permute(0, 3, 2, 1).reshape(B, -1, KK * self.n_in)

    def normalize(self, logits: Tensor) -> Tensor:
        """R (B, L, C, N) from log(a_j p_ij): softmax over every parent of each child, across the
        windows that share it, by scatter over the child index (a per-child max keeps it finite)."""
        B, L, _, N = logits.shape
        s = torch.logsumexp(logits, dim=2).flatten(1)  # (B, L*N): over the types of one window
        index = self.child_index.flatten().expand(B, -1)
        top = s.new_full((B, self.cover.numel()), -torch.inf)
        top = top.scatter_reduce(1, index, s.detach(), "amax").gather(1, index)  # (B, L*N)
        total = s.new_zeros(B, self.cover.numel()).scatter_add(1, index, torch.exp(s - top))
        log_z = torch.log(total.gather(1, index)) + top  # (B, L*N): log sum over the child's parents
        return torch.exp(logits - log_z.view(B, L, 1, N))

    def child_totals(self, R: Tensor) -> Tensor:
        """sum_j R_ij (B, covered children) of an assignment R (B, L, C, N): 1 for each child."""
        B = R.shape[0]
        tot = R.new_zeros(B, self.cover.numel()).scatter_add(1, self.child_index.flatten().expand(B, -1),
                                                              R.sum(2).flatten(1))  # fmt: skip
        return tot[:, self.cover > 0]

    def forward(self, pose: Tensor, act: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, n_in, 16, g, g), (B, n_in, g, g) -> poses (B, C, 16, g', g'), activations
        (B, C, g', g') and the last assignment R (B, L, C, N)."""
        B, g = pose.shape[0], self.grid_out
        it, lam, inner = self.routing
        a, mu, R = em_routing(self.votes(pose), self.child_activations(act), self.r0, (self.beta_u, self.beta_a),
                              it, lam, self.normalize, self.unit_mass, inner)  # fmt: skip
        pose_out = mu.permute(0, 2, 3, 1).reshape(B, -1, POSE, g, g)  # (B, L, C, 16) -> (B, C, 16, g', g')
        return pose_out, a.transpose(1, 2).reshape(B, -1, g, g), R


class ClassCaps(nn.Module):
    """Class capsules: one transform per (child type, class) shared over positions, coordinate
    addition, EM routing over all D x g x g children (softmax over the classes)."""

    def __init__(self, n_in: int, n_cls: int, grid: int, input_size: int, routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.W = nn.Parameter(W_STD * torch.randn(n_in, n_cls, 4, 4))  # (D, E, 4, 4)
        self.beta_u = nn.Parameter(torch.zeros(n_cls))
        self.beta_a = nn.Parameter(torch.zeros(n_cls))
        self.register_buffer("coord", self._coordinates(n_in, grid, input_size), persistent=False)

    @staticmethod
    def _coordinates(n_in: int, grid: int, input_size: int) -> Tensor:
        """(N, 16): each child's scaled receptive-field centre (row, col) in pose entries (0, 3)
        and (1, 3). A ConvCaps2 unit k sees pixels centred on 4k + 8 (strides 2, 1, 2, 1)."""
        centre = (4 * torch.arange(grid, dtype=torch.float32) + 8.5) / input_size  # (g,)
        coord = torch.zeros(n_in, grid, grid, 4, 4)
        coord[..., 0, 3] = centre.view(grid, 1)
        coord[..., 1, 3] = centre.view(1, grid)
        return coord.reshape(n_in * grid * grid, POSE)

    def forward(self, pose: Tensor, act: Tensor, iters: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, D, 16, g, g), (B, D, g, g) -> activations (B, E), poses (B, E, 16), R (B, N, E)."""
        B, D, _, g, _ = pose.shape
        M = pose.reshape(B, D, 4, 4, g * g)
        v = torch.einsum("bdijp,dejk->bedpik", M, self.W).reshape(B, 1, -1, D * g * g, POSE) + self.coord
        a_in = act.reshape(B, 1, D * g * g)  # children ordered (type, row, col) like the votes
        n_cls, N = v.shape[2], v.shape[3]
        it, lam, inner = self.routing
        a, mu, R = em_routing(make_votes(v.unflatten(-1, (4, 4))), a_in, 1.0 / n_cls, (self.beta_u, self.beta_a),
                              iters or it, lam, lambda z: torch.softmax(z, dim=2), N / n_cls, inner)  # fmt: skip
        return a[:, 0], mu[:, 0], R[:, 0].transpose(1, 2)


def spread_loss(a: Tensor, y: Tensor, margin: Tensor | float) -> Tensor:
    """Per-example spread loss (B,): sum_{i != t} max(0, m - (a_t - a_i))^2 of activations (B, E)."""
    a_t = a.gather(1, y[:, None])  # (B, 1)
    gap = F.relu(margin - (a_t - a)) ** 2  # (B, E); the target's own term is m^2, removed below
    return gap.sum(1) - F.relu(torch.as_tensor(margin, dtype=a.dtype)) ** 2


class MatrixCapsNet(CapsuleModel):
    """Matrix capsules with EM routing; scores are the class activations in (0, 1) (the
    interface's "lengths"), capsules the class poses (B, E, 16), no decoder."""

    loss_name = "spread loss on class activations, margin 0.2 -> 0.9 (attacks: margin loss on activations)"
    score_name = "log(a / (1 - a)) of the class activations a (their logit)"

    def __init__(self, cfg: MatrixCapsNetConfig) -> None:
        super().__init__()
        g1, g2, g3 = cfg.grids
        if g3 < 1:
            raise CapsbenchError(f"input_size {cfg.input_size} is too small for MatrixCapsNet (needs >= 17)")
        self.cfg, self.input_size, self.num_classes = cfg, cfg.input_size, cfg.num_classes
        self.class_dim, self.recon_weight, self.decoder = POSE, 0.0, None
        self.m_plus, self.m_minus, self.lambda_ = cfg.m_plus, cfg.m_minus, cfg.lambda_
        self.primary_layout = (cfg.D, g3)  # the class layer's children: D types x g3 x g3
        routing = Routing(cfg.routing_iters, cfg.final_lambda, cfg.inner_routing_grad)
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.A, 5, stride=2)
        self.primary_pose = nn.Conv2d(cfg.A, cfg.B * POSE, 1)
        self.primary_act = nn.Conv2d(cfg.A, cfg.B, 1)
        self.caps1 = ConvCaps(cfg.B, cfg.C, 3, 2, g1, routing)
        self.caps2 = ConvCaps(cfg.C, cfg.D, 3, 1, g2, routing)
        self.classes = ClassCaps(cfg.D, cfg.num_classes, g3, cfg.input_size, routing)
        self.register_buffer("spread_steps", torch.zeros((), dtype=torch.long))  # training calls of objective
        self.uniform = False

    def primary_capsules(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Poses (B, B_types, 16, g1, g1) and activations (B, B_types, g1, g1), in fp32 (or fp64)
        even under autocast: routing runs in full precision."""
        h = F.relu(self.conv1(x))  # (B, A, g1, g1)
        B, _, g, _ = h.shape
        fp = torch.promote_types(h.dtype, torch.float32)
        return self.primary_pose(h).view(B, -1, POSE, g, g).to(fp), torch.sigmoid(self.primary_act(h)).to(fp)

    def route(self, pose: Tensor, act: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Class activations (B, E), poses (B, E, 16) and each EM layer's last assignment R."""
        with torch.autocast(pose.device.type, enabled=False):
            pose, act, R1 = self.caps1(pose, act)
            pose, act, R2 = self.caps2(pose, act)
            a, mu, R3 = self.classes(pose, act, 1 if self.uniform else None)
        return a, mu, [R1, R2, R3]

    def chunks(self, x: Tensor) -> Iterator[tuple[Tensor, Tensor, list[Tensor]]]:
        """``route`` on ``chunk_size`` examples at a time (each example is routed on its own
        either way): bounds the memory of large evaluation batches."""
        pose, act = self.primary_capsules(x)
        n = self.chunk_size(x)
        for p, a in zip(pose.split(n), act.split(n)):
            yield self.route(p, a)

    def chunk_size(self, x: Tensor) -> int:
        """``routing_chunk``, or (0) as many examples as keep ConvCaps1's votes within
        CHUNK_BYTES on this device (30 MB an example at 28x28, A=B=C=D=32)."""
        if self.cfg.routing_chunk:
            return self.cfg.routing_chunk
        per_example = 4 * 2 * POSE * self.caps1.grid_out**2 * self.cfg.C * 9 * self.cfg.B
        return max(1, CHUNK_BYTES[x.device.type == "cpu"] // per_example)

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        parts = [(a, mu, Rs[-1]) for a, mu, Rs in self.chunks(x)]
        a, mu, R = (torch.cat(t) for t in zip(*parts))
        return ModelOutput(a, mu, None, R, None)

    def assignment_totals(self, x: Tensor) -> list[Tensor]:
        """Per EM layer, sum over parents of each (covered) child's final assignment: all ones."""
        parts = [[self.caps1.child_totals(R1), self.caps2.child_totals(R2), R3.sum(-1)]
                 for _, _, (R1, R2, R3) in self.chunks(x)]  # fmt: skip
        return [torch.cat(t) for t in zip(*parts)]

    def spread_margin(self) -> Tensor:
        """The spread loss's margin now: margin_start + (end - start) * progress, progress =
        training calls of ``objective`` / margin_ramp_steps, capped at 1 (a 0-dim tensor)."""
        cfg = self.cfg
        if cfg.margin_ramp_steps == 0:
            return torch.tensor(cfg.margin_end, device=self.spread_steps.device)
        progress = (self.spread_steps.float() / cfg.margin_ramp_steps).clamp(max=1.0)
        return cfg.margin_start + (cfg.margin_end - cfg.margin_start) * progress

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        """Spread loss (batch mean). Each training-mode call advances the margin's schedule (a
        buffer, so a resumed run continues it): the trainer passes no step number."""
        loss = spread_loss(out.scores.float(), y, self.spread_margin()).mean()
        if self.training:
            with torch.no_grad():
                self.spread_steps.add_(1)
        return loss

    @property
    def routes(self) -> bool:
        return True

    @contextlib.contextmanager
    def uniform_votes(self) -> Iterator[None]:
        """For the duration, the class layer fits its Gaussians to the uniform assignment (one
        M-step, no E-step): pose = the activation-weighted mean vote, activation from that fit's
        cost. The vote attack's surrogate (Gu et al. 2021) for EM routing."""
        before = self.uniform
        self.uniform = True
        try:
            yield
        finally:
            self.uniform = before
