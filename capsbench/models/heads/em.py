"""EM routing (Hinton, Sabour & Frosst, ICLR 2018, "Matrix capsules with EM routing"), adapted to
CapsNet's vector capsules.

Each parent j is a Gaussian with mean mu_j and diagonal variance sigma_j^2 over the D = 16
dimensions of its votes; each child i has activation a_i = |u_i|, its primary capsule's length.
``routing_iters`` rounds of M-step (fit the parents to the votes weighted by R_ij a_i, and
activate them by their cost) and E-step (reassign each child to the parents that explain its vote).
The class capsule is v_j = a_j mu_j / |mu_j|: its length is the parent's activation a_j in (0, 1).

Adaptations (the paper has matrix capsules, convolutional capsule layers and a spread loss; its
cost, sum_h (beta_u + log sigma_jh) sum_i R_ij a_i, grows with N = 1152 and D = 16 and would
saturate the logistic, so that the margin loss's gradients vanish):
- cost_j = share_j mean_h (beta_u_j + log sigma_jh), with share_j = sum_i R_ij a_i / sum_i a_i the
  parent's share of the children's activation (sums to 1 over parents) instead of the raw sum,
  and the mean over the D dimensions instead of the sum.
- The cost is centred over the parents, a_j = logistic(lambda (beta_a_j - (cost_j - mean_k
  cost_k))), so that the absolute scale of the votes (W starts at 0.01) does not drive every
  activation to 0 or 1. Public implementations normalise the cost likewise (most also divide by
  its spread over the parents, which is ill-conditioned at initialisation, when it is ~0).
- Inverse temperature lambda_t = 4 (t + 1) / T over T iterations (4 = sqrt(D) at the last, the
  gain the mean over D dimensions removed, sqrt since their fluctuations add up like a random
  walk): the paper fixes a schedule without giving it.
- R starts uniform (1/C) for every example; the final assignment R is returned as the coupling.

Parameters: beta_u and beta_a, one each per class: 2C = 20. The paper CapsNet at 28x28
(N = 1152, C = 10, D = 16, P = 8): W = N C D P = 1,474,560, plus 6,741,008 outside the head,
plus 2C = 20: 8,215,588 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.models.heads.base import HEADS, HeadSpec, Routed, RoutingHead, length, unit

VAR_EPS = 1e-6  # added to every variance: a parent fitted to one vote stays finite
MASS_EPS = 1e-8  # in denominators of sums of activations
LAMBDA_MAX = 4.0  # inverse temperature at the last iteration


def inverse_temperature(t: int, iters: int) -> float:
    """lambda at iteration t of ``iters``: rising linearly to ``LAMBDA_MAX`` at the last."""
    return LAMBDA_MAX * (t + 1) / iters


def m_step(votes: Tensor, a_in: Tensor, R: Tensor, beta_u: Tensor, beta_a: Tensor,
           lam: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Fit the parents to votes (B, N, C, D) weighted by R (B, N, C) times a_in (B, N).
    Returns mu and sigma^2 (B, C, D) and the activation logits (B, C): a = sigmoid(logits)."""
    r = R * a_in.unsqueeze(-1)  # (B, N, C): R_ij a_i
    mass = r.sum(1)  # (B, C)
    w = (r / (mass.unsqueeze(1) + MASS_EPS)).unsqueeze(-1)  # (B, N, C, 1): sums to 1 over children
    mu = (w * votes).sum(1)  # (B, C, D)
    var = (w * (votes - mu.unsqueeze(1)).square()).sum(1) + VAR_EPS  # (B, C, D)
    share = mass / (a_in.sum(1, keepdim=True) + MASS_EPS)  # (B, C): sums to 1 over parents
    cost = share * (beta_u.unsqueeze(-1) + 0.5 * var.log()).mean(-1)  # (B, C): mean_h (beta_u + log sigma_h)
    return mu, var, lam * (beta_a - (cost - cost.mean(1, keepdim=True)))


def e_step(votes: Tensor, mu: Tensor, var: Tensor, logits: Tensor) -> Tensor:
    """R_ij = a_j p_j(V_ij) / sum_k a_k p_k(V_ij) (B, N, C), in log space; the Gaussians'
    constant log(2 pi) D / 2 cancels."""
    z = (votes - mu.unsqueeze(1)).square() / var.unsqueeze(1)  # (B, N, C, D)
    log_p = -0.5 * (z + var.log().unsqueeze(1)).sum(-1)  # (B, N, C)
    return torch.softmax(F.logsigmoid(logits).unsqueeze(1) + log_p, dim=2)


def em_routing(u_hat: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iters: int,
               inner_grad: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """EM routing of votes u_hat (B, N, C, D) from children with activations a_in (B, N), each
    example on its own. Returns class capsules v (B, C, D) with |v_j| = a_j and the final
    assignment R (B, N, C). With ``inner_grad=False`` the iterations before the last see
    detached votes."""
    inner = u_hat if inner_grad else u_hat.detach()
    R = u_hat.new_full(u_hat.shape[:3], 1.0 / u_hat.shape[2])  # (B, N, C)
    for t in range(iters):
        votes = u_hat if t == iters - 1 else inner
        mu, var, logits = m_step(votes, a_in, R, beta_u, beta_a, inverse_temperature(t, iters))
        if t < iters - 1:
            R = e_step(votes, mu, var, logits)
    return torch.sigmoid(logits).unsqueeze(-1) * unit(mu), R


@HEADS.register("em", description="EM routing (Hinton et al. 2018) on vector capsules, a_i = |u_i|")
class EMHead(RoutingHead):
    """Gaussian parents fitted by EM to the votes; learned beta_u, beta_a per class (zeros)."""

    iterates = True

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        self.beta_u = nn.Parameter(torch.zeros(spec.num_classes))  # cost per dimension of a parent
        self.beta_a = nn.Parameter(torch.zeros(spec.num_classes))  # activation offset of a parent

    @classmethod
    def own_params(cls, spec: HeadSpec) -> int:
        return 2 * spec.num_classes

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        a_in = length(u.to(u_hat.dtype))  # (B, N): the primary capsules' lengths, in the votes' fp32
        v, R = em_routing(u_hat, a_in, self.beta_u, self.beta_a, self.spec.iters, self.spec.inner_grad)
        return Routed(v, R)
