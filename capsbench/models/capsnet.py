"""CapsNet with dynamic routing (Sabour, Frosst & Hinton, NIPS 2017, arXiv 1710.09829).

Exactly the paper's MNIST network: 8,215,568 parameters at 28x28 with the decoder,
6,804,224 without it (see shared/capsnet-facts.md). Loss in the paper's form: margin loss
summed over classes plus 0.0005 x the per-image sum of squared reconstruction errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.models.base import BenchModel, ModelOutput

SQUASH_EPS = 1e-8


def squash(s: Tensor, dim: int = -1) -> Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|; eps inside the root keeps the gradient finite at 0."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return s * (n2 / (1.0 + n2) / torch.sqrt(n2 + SQUASH_EPS))


def dynamic_routing(u_hat: Tensor, iters: int, inner_grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Routing-by-agreement (Procedure 1 of the paper), independently for every example.

    u_hat: (B, N, C, D) predictions of N child capsules for C parents. Returns v (B, C, D),
    the final coupling c (B, N, C) (softmax over the C parents) and routing logits b (B, N, C).
    With ``inner_grad=False`` the iterations before the last see a detached u_hat.
    """
    u_inner = u_hat if inner_grad else u_hat.detach()
    b = u_hat.new_zeros(u_hat.shape[:3])  # (B, N, C): starts at 0 for every example
    for i in range(iters):
        last = i == iters - 1
        u = u_hat if last else u_inner
        c = torch.softmax(b, dim=2)  # over parents, not over children
        s = torch.einsum("bnc,bncd->bcd", c, u)  # (B, C, D)
        v = squash(s)
        if not last:
            b = b + torch.einsum("bncd,bcd->bnc", u, v)  # agreement u_hat . v
    return v, c, b


@dataclass(frozen=True)
class CapsNetConfig:
    input_size: int = 28  # 28 (MNIST) or 40 (affNIST canvas); primary capsules follow
    in_channels: int = 1
    num_classes: int = 10
    conv_channels: int = 256
    primary_types: int = 32
    primary_dim: int = 8
    class_dim: int = 16
    routing_iters: int = 3
    reconstruction: bool = True
    inner_routing_grad: bool = True  # official code backpropagates through every iteration
    recon_weight: float = 0.0005
    decoder_hidden: tuple[int, int] = (512, 1024)
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = 0.5

    @property
    def primary_grid(self) -> int:
        conv1 = self.input_size - 8  # 9x9 valid conv, stride 1
        return (conv1 - 9) // 2 + 1  # 9x9 valid conv, stride 2

    @property
    def num_primary(self) -> int:
        return self.primary_grid**2 * self.primary_types


class CapsNet(BenchModel):
    """Conv1 -> PrimaryCaps -> DigitCaps (dynamic routing) -> optional decoder."""

    loss_name = "margin loss (attacks: margin loss on capsule lengths)"

    def __init__(self, cfg: CapsNetConfig) -> None:
        super().__init__()
        if cfg.primary_grid < 1:
            raise ValueError(f"input_size {cfg.input_size} is too small for CapsNet (needs >= 25)")
        if cfg.routing_iters < 1:
            raise ValueError("routing_iters must be >= 1")
        self.cfg = cfg
        self.input_size = cfg.input_size
        self.num_classes = cfg.num_classes
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv_channels, 9)
        self.primary = nn.Conv2d(cfg.conv_channels, cfg.primary_types * cfg.primary_dim, 9, stride=2)
        # One 8x16 matrix per (child capsule, parent class), stored (N, C, D_out, D_in).
        self.W = nn.Parameter(0.01 * torch.randn(cfg.num_primary, cfg.num_classes, cfg.class_dim, cfg.primary_dim))
        self.decoder = self._decoder(cfg) if cfg.reconstruction else None

    @staticmethod
    def _decoder(cfg: CapsNetConfig) -> nn.Sequential:
        h1, h2 = cfg.decoder_hidden
        return nn.Sequential(
            nn.Linear(cfg.num_classes * cfg.class_dim, h1), nn.ReLU(inplace=True),
            nn.Linear(h1, h2), nn.ReLU(inplace=True),
            nn.Linear(h2, cfg.in_channels * cfg.input_size**2), nn.Sigmoid(),
        )  # fmt: skip

    def primary_capsules(self, x: Tensor) -> Tensor:
        """(B, 1, S, S) -> (B, N, 8) squashed primary capsules."""
        cfg = self.cfg
        h = F.relu(self.conv1(x))
        p = self.primary(h)  # (B, 32*8, G, G), channel = type*8 + dim
        B, _, G, _ = p.shape
        # (B, 32, 8, G, G) -> (B, 32, G, G, 8) -> (B, N, 8): capsule index = (type, row, col)
        p = p.view(B, cfg.primary_types, cfg.primary_dim, G, G).permute(0, 1, 3, 4, 2)
        return squash(p.reshape(B, -1, cfg.primary_dim))

    def predictions(self, u: Tensor) -> Tensor:
        """u_hat[b, n, c] = W[n, c] @ u[b, n] as one batched matmul over the N children."""
        N, C, D, P = self.W.shape
        B = u.shape[0]
        w = self.W.permute(0, 3, 1, 2).reshape(N, P, C * D)  # (N, 8, C*16)
        u_hat = torch.bmm(u.transpose(0, 1), w)  # (N, B, C*16)
        return u_hat.view(N, B, C, D).transpose(0, 1)  # (B, N, C, 16)

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        u_hat = self.predictions(self.primary_capsules(x)).float()  # routing in fp32
        v, c, b = dynamic_routing(u_hat, self.cfg.routing_iters, self.cfg.inner_routing_grad)
        lengths = v.norm(dim=-1)  # (B, C)
        recon = None
        if self.decoder is not None:
            # Mask by the label while training, by the prediction otherwise.
            target = y if (self.training and y is not None) else lengths.argmax(dim=1)
            recon = self.decode(v, target)
        return ModelOutput(lengths, v, recon, c, b)

    def decode(self, capsules: Tensor, target: Tensor) -> Tensor:
        """Decoder image (B, S*S) from class capsules (B, C, D), every capsule but ``target``'s
        (B,) masked to zero: the reconstruction path of ``forward``."""
        if self.decoder is None:
            raise ValueError("this CapsNet has no decoder (built with reconstruction=False); nothing to decode")
        mask = F.one_hot(target, self.num_classes).to(capsules.dtype)  # (B, C)
        return self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))

    def margin_loss(self, lengths: Tensor, y: Tensor) -> Tensor:
        """Per-example margin loss (B,), summed over classes (paper eq. 4)."""
        cfg = self.cfg
        t = F.one_hot(y, self.num_classes).to(lengths.dtype)
        present = t * F.relu(cfg.m_plus - lengths) ** 2
        absent = cfg.lambda_ * (1 - t) * F.relu(lengths - cfg.m_minus) ** 2
        return (present + absent).sum(dim=1)

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        loss = self.margin_loss(out.scores, y).mean()
        if out.reconstruction is not None:
            sse = ((out.reconstruction.float() - x.flatten(1).float()) ** 2).sum(dim=1)
            loss = loss + self.cfg.recon_weight * sse.mean()
        return loss

    def attack_loss(self, out: ModelOutput, y: Tensor) -> Tensor:
        return self.margin_loss(out.scores.float(), y)
