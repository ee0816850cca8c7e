"""Squash and routing-by-agreement (Procedure 1 of Sabour et al. 2017), in two formulations
that compute the same function:

- ``dynamic_routing``: predictions laid out (B, N, C, D), broadcast multiply-and-sum, autograd
  differentiates it. The reference, and the GPU path (where torch.compile fuses it).
- ``parent_major_routing``: predictions laid out (B, C, N, D) so that both contractions of an
  iteration (s = sum_n c u_hat and u_hat . v) are batched matrix-vector products that stream
  u_hat once and never materialise a product tensor, with a hand-written backward that
  accumulates the gradient of u_hat into one buffer. About 2x less memory traffic on a CPU,
  where routing is bandwidth-bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

SQUASH_EPS = 1e-8


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|; eps inside the root keeps the gradient finite at 0."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return s * (n2 / (1.0 + n2) / torch.sqrt(n2 + SQUASH_EPS))


def dynamic_routing(u_hat: Tensor, iters: int, inner_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Routing-by-agreement, independently for every example.

    u_hat: (B, N, C, D) predictions of N child capsules for C parents. Returns v (B, C, D),
    the final coupling c (B, N, C) (softmax over the C parents) and routing logits b (B, N, C).
    With ``inner_grad=False`` the iterations before the last see a detached u_hat.
    Products are broadcast multiply-and-sum: on a CPU they stream u_hat once each, where an
    einsum would first copy it into a batched-matmul layout.
    """
    u_inner = u_hat if inner_grad else u_hat.detach()
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, N, C): starts at 0 for every example
    for i in range(iters):
        last = i == iters - 1
        u = u_hat if last else u_inner
        c = torch.softmax(b, dim=2)  # over parents, not over children
        v = squash((c.unsqueeze(-1) * u).sum(1))  # s = sum_n c u_hat: (B, C, D)
        if not last:
            b = b + (u * v.unsqueeze(1)).sum(-1)  # agreement u_hat . v: (B, N, C)
    return v, c, b


def parent_major_routing(u_hat: Tensor, iters: int, inner_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``dynamic_routing`` for predictions laid out (B, C, N, D) (parents before children).

    Returns v (B, C, D) and the final coupling c and logits b as (B, N, C) views, like
    ``dynamic_routing``. Differentiable in u_hat (first order).
    """
    v, c, b = _ParentMajorRouting.apply(u_hat, iters, inner_grad)
    return v, c.transpose(1, 2), b.transpose(1, 2)


def _softmax_parents(b: Tensor) -> Tensor:
    """Softmax over dim 1 (parents) of (B, C, N) logits, written out: torch.softmax over a
    strided dim is several times slower, and these tensors are small."""
    e = (b - b.amax(1, keepdim=True)).exp_()
    return e.div_(e.sum(1, keepdim=True))


def _squash_grad(s: Tensor, grad_v: Tensor) -> Tensor:
    """d squash(s) / ds applied to grad_v (small (B*C, 1, D) tensors)."""
    with torch.enable_grad():
        s = s.detach().requires_grad_()
        return torch.autograd.grad(squash(s), s, grad_v)[0]


class _ParentMajorRouting(torch.autograd.Function):
    """Forward: per iteration t, c_t = softmax(b_t), s_t = c_t @ U, v_t = squash(s_t),
    b_{t+1} = b_t + U @ v_t, with U the (N, D) predictions of one (example, parent) pair.
    Saved: U and the small b_t, s_t, v_t. Backward walks the iterations in reverse."""

    @staticmethod
    def forward(ctx, u_hat: Tensor, iters: int, inner_grad: bool) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        B, C, N, D = u_hat.shape
        U = u_hat.reshape(B * C, N, D)
        b = u_hat.new_zeros(B * C, 1, N)
        saved: list[Tensor] = []  # b_t, s_t, v_t per iteration
        with torch.autocast(u_hat.device.type, enabled=False):  # routing stays in u_hat's dtype
            for i in range(iters):
                c = _softmax_parents(b.view(B, C, N)).view(B * C, 1, N)
                s = torch.bmm(c, U)  # (B*C, 1, D)
                v = squash(s)
                saved += [b, s, v]
                if i < iters - 1:
                    b = b + torch.bmm(U, v.transpose(1, 2)).transpose(1, 2)  # agreement: (B*C, 1, N)
        ctx.save_for_backward(U, *saved)
        ctx.shape, ctx.iters, ctx.inner_grad = (B, C, N, D), iters, inner_grad
        return v.view(B, C, D), c.view(B, C, N), b.view(B, C, N)

    @staticmethod
    def backward(ctx, grad_v: Tensor, grad_c: Tensor | None, grad_b: Tensor | None):  # type: ignore[override]
        B, C, N, D = ctx.shape
        U, *saved = ctx.saved_tensors
        with torch.autocast(U.device.type, enabled=False):
            grad_u = _backward(U, saved, (B, C, N, D), ctx.iters, ctx.inner_grad, grad_v, grad_c, grad_b)
        return grad_u.view(B, C, N, D), None, None


def _backward(U: Tensor, saved: list[Tensor], shape: tuple[int, int, int, int], iters: int, inner_grad: bool,
              grad_v: Tensor, grad_c: Tensor | None, grad_b: Tensor | None) -> Tensor:  # fmt: skip
    """Gradient of the routing outputs with respect to U (B*C, N, D), iterations in reverse.
    Only iteration 0's coupling is constant (b_0 = 0); with ``inner_grad=False`` the earlier
    iterations saw a detached u_hat, so only the last one's s = c U contributes."""
    B, C, N, D = shape
    gv = grad_v.reshape(B * C, 1, D)
    gb = None if grad_b is None else grad_b.reshape(B * C, 1, N)
    grad_u: Tensor | None = None
    for t in range(iters - 1, -1, -1):
        b, s, _ = saved[3 * t : 3 * t + 3]
        c = _softmax_parents(b.view(B, C, N)).view(B * C, 1, N)
        gs = _squash_grad(s, gv)  # (B*C, 1, D)
        cT = c.transpose(1, 2)  # (B*C, N, 1)
        grad_u = cT * gs if grad_u is None else grad_u.addcmul_(cT, gs)  # s = c U: dU += c^T gs
        if t == 0 or not inner_grad:
            break
        gc = torch.bmm(gs, U.transpose(1, 2))  # (B*C, 1, N)
        if t == iters - 1 and grad_c is not None:
            gc = gc + grad_c.reshape(B * C, 1, N)
        cc, g = c.view(B, C, N), gc.view(B, C, N)
        gb_t = (cc * (g - (g * cc).sum(1, keepdim=True))).view(B * C, 1, N)  # softmax backward
        gb = gb_t if gb is None else gb + gb_t  # b_t = b_{t-1} + U v_{t-1}: the same gradient for both
        v_prev = saved[3 * (t - 1) + 2]
        grad_u.addcmul_(gb.transpose(1, 2), v_prev)  # agreement: dU += gb^T v_{t-1}
        gv = torch.bmm(gb, U)  # (B*C, 1, D): into v_{t-1}
    assert grad_u is not None
    return grad_u
