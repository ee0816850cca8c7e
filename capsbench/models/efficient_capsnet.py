"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021, "Efficient-CapsNet: capsule network with
self-attention routing"), the official MNIST network (EscVM/Efficient-CapsNet, ``utils/layers.py``
and ``models/efficient_capsnet_graph_mnist.py``), written anew in PyTorch.

Layers at 28x28 (trainable parameters; BatchNorm counts gamma and beta, its running statistics
are buffers):

| layer | output | parameters |
|---|---|---|
| Conv 5x5, 32, valid, ReLU, BN | 24x24x32 | 5*5*1*32 + 32 = 832, BN 64: 896 |
| Conv 3x3, 64, valid, ReLU, BN | 22x22x64 | 3*3*32*64 + 64 = 18,496, BN 128: 18,624 |
| Conv 3x3, 64, valid, ReLU, BN | 20x20x64 | 3*3*64*64 + 64 = 36,928, BN 128: 37,056 |
| Conv 3x3 stride 2, 128, valid, ReLU, BN | 9x9x128 | 3*3*64*128 + 128 = 73,856, BN 256: 74,112 |
| PrimaryCaps: depthwise 9x9 (groups 128) -> 16 x 8D, squash | 16x8 | 9*9*128 + 128 = 10,496 |
| FCCaps: W (16, 10, 8, 16) and prior b (16, 10, 1) | 10x16 | 20,480 + 160 = 20,640 |
| total without decoder | | **161,824** |
| Decoder 160 -> 512 -> 1024 -> 784, ReLU/ReLU/sigmoid | 784 | 82,432 + 525,312 + 803,600 = 1,411,344 |
| total with decoder | | **1,573,168** |

Routing (one pass, no iterations): votes u_hat_ij = u_i W_ij (B, 16, 10, 16); per parent j the
agreement A_j = u_hat_j u_hat_j^T / sqrt(16) (16 x 16 over children); c_ij = softmax over parents
of sum_k A_j[i, k]; s_j = sum_i u_hat_ij (c_ij + b_ij); v_j = squash(s_j); scores |v_j|.
Squash (Efficient-CapsNet's): (1 - e^-|s|) s / |s|.

Loss: margin loss (m+ 0.9, m- 0.1, lambda 0.5, summed over classes, batch mean) plus the
reconstruction. The official code compiles ``loss=[marginLoss, 'mse'], loss_weights=[1, 0.392]``
(config.json ``lmd_gen``); Keras' 'mse' on a 28x28x1 image is the mean over its 784 pixels, so
the term is 0.392 x SSE / 784 = **0.0005 x the per-image sum of squared errors**, capsbench's
``recon_weight`` (the same weight as CapsNet's paper form).

Where this differs from the official code, on purpose:
- W is stored child-major, (16 children, 10 parents, 8, 16), and b as (16, 10, 1); the official
  code stores (10, 16, 8, 16) and (10, 16, 1) (the first two axes swapped; same numbers).
- Layer order follows the official graph: Conv with ReLU, then BatchNorm (not BN then ReLU).
  BatchNorm uses Keras' defaults: momentum 0.99 (PyTorch's ``momentum=0.01``), eps 1e-3.
- Initialisation follows Keras: he_normal (truncated) for the convolutions, W and the hidden
  decoder layers, glorot_uniform for the depthwise convolution, glorot_normal for the decoder's
  output layer, zero biases and zero prior b.
- The eps of the squash sits inside the square root (finite gradient at s = 0), where the
  official code adds 1e-20 to e^|s| and to |s|; lengths are the plain norm of v (the official
  ``Length`` adds 1e-7 under the root).
- The coupling returned in ``ModelOutput.coupling`` is the softmax c (sums to 1 over parents);
  the weight the official code applies is c + b.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from capsbench.core.config import opt
from capsbench.models.base import ModelOutput
from capsbench.models.capsule import CapsuleModel

INPUT_SIZE = 28
NUM_CLASSES, NUM_PRIMARY, PRIMARY_DIM, CLASS_DIM = 10, 16, 8, 16
STEM = ((1, 32, 5, 1), (32, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 2))  # (in, out, kernel, stride)
SQUASH_EPS = 1e-7  # inside the root: |s| >= 3e-4, so the gradient is finite at s = 0
TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated at +-2 (Keras' truncated initialisers)


def efficient_squash(s: Tensor, dim: int = -1) -> Tensor:
    """v = (1 - e^-|s|) s / |s| (Efficient-CapsNet's squash); eps inside the root."""
    n = torch.sqrt((s * s).sum(dim=dim, keepdim=True) + SQUASH_EPS)
    return s * (-torch.expm1(-n) / n)


@dataclass(frozen=True)
class EfficientCapsNetConfig:
    input_size: int = INPUT_SIZE  # only 28 (MNIST): the model refuses any other size
    reconstruction: bool = True
    recon_weight: float = opt(0.0005, ge=0)  # official 0.392 x per-pixel MSE = 0.392 / 784 x SSE
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = opt(0.5, ge=0)
    bn_momentum: float = opt(0.01, gt=0, le=1)  # PyTorch's convention for Keras' momentum 0.99
    bn_eps: float = opt(1e-3, gt=0)  # Keras' default


def _keras_normal_(w: Tensor, scale: float, fan: float) -> None:
    """Keras' truncated VarianceScaling: normal cut at +-2 std, variance scale / fan after the cut."""
    std = math.sqrt(scale / fan) / TRUNC_STD
    # By the inverse CDF: nn.init.trunc_normal_'s rejection sampling takes ~0.5 s for the decoder.
    edge = math.erf(-2 / math.sqrt(2))  # 2 Phi(-2) - 1
    w.uniform_(edge, -edge).erfinv_().mul_(std * math.sqrt(2)).clamp_(-2 * std, 2 * std)


class EfficientCapsNet(CapsuleModel):
    """Conv stem -> depthwise PrimaryCaps (16 x 8D) -> FCCaps (self-attention routing) -> decoder."""

    score_name = "log(l / (1 - l)) of the capsule lengths l (= log(e^n - 1) of the pre-squash norm n)"
    primary_layout = None  # 16 capsules from one 1x1 map: no types x grid layout

    def __init__(self, cfg: EfficientCapsNetConfig) -> None:
        super().__init__()
        if cfg.input_size != INPUT_SIZE:
            raise ValueError(f"efficient-capsnet is defined for 28x28 MNIST only (its 9x9 depthwise primary "
                             f"capsules need a 28x28 input's 9x9 map); got input_size {cfg.input_size}")  # fmt: skip
        self.cfg = cfg
        self.input_size, self.num_classes = INPUT_SIZE, NUM_CLASSES
        self.class_dim, self.recon_weight = CLASS_DIM, cfg.recon_weight
        self.m_plus, self.m_minus, self.lambda_ = cfg.m_plus, cfg.m_minus, cfg.lambda_
        self.stem = nn.Sequential(*(self._conv_block(*layer) for layer in STEM))
        self.primary = nn.Conv2d(128, NUM_PRIMARY * PRIMARY_DIM, 9, groups=128)  # depthwise
        self.W = nn.Parameter(torch.empty(NUM_PRIMARY, NUM_CLASSES, PRIMARY_DIM, CLASS_DIM))  # (N, C, 8, 16)
        self.b = nn.Parameter(torch.zeros(NUM_PRIMARY, NUM_CLASSES, 1))  # learned coupling prior (N, C, 1)
        self.decoder = self._decoder() if cfg.reconstruction else None
        self._uniform_votes = False
        self._keras_init()

    def _conv_block(self, c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
        # The official order: the convolution's ReLU, then BatchNorm.
        bn = nn.BatchNorm2d(c_out, eps=self.cfg.bn_eps, momentum=self.cfg.bn_momentum)
        return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride), nn.ReLU(inplace=True), bn)

    @staticmethod
    def _decoder() -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(NUM_CLASSES * CLASS_DIM, 512), nn.ReLU(inplace=True),
            nn.Linear(512, 1024), nn.ReLU(inplace=True),
            nn.Linear(1024, INPUT_SIZE**2), nn.Sigmoid(),
        )  # fmt: skip

    @torch.no_grad()
    def _keras_init(self) -> None:
        """The official code's (Keras') initialisers; biases zero."""
        for conv in (m for m in self.stem.modules() if isinstance(m, nn.Conv2d)):
            _keras_normal_(conv.weight, 2.0, conv.weight[0].numel())  # he_normal, fan_in = k*k*in
        limit = math.sqrt(6 / (9 * 9 + 9 * 9 * 128))  # glorot_uniform of Keras' depthwise kernel (9, 9, 1, 128)
        nn.init.uniform_(self.primary.weight, -limit, limit)
        _keras_normal_(self.W, 2.0, PRIMARY_DIM * NUM_PRIMARY * NUM_CLASSES)  # he_normal of a (10, 16, 8, 16) kernel
        if self.decoder is not None:
            linears = [m for m in self.decoder if isinstance(m, nn.Linear)]
            for lin in linears[:-1]:
                _keras_normal_(lin.weight, 2.0, lin.in_features)  # he_normal
            out = linears[-1]
            _keras_normal_(out.weight, 2.0, out.in_features + out.out_features)  # glorot_normal
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.zeros_(m.bias)

    def primary_capsules(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) -> (B, 16, 8) squashed primary capsules."""
        p = self.primary(self.stem(x))  # (B, 128, 1, 1); capsule n = channels 8n .. 8n+7
        return efficient_squash(p.flatten(1).view(-1, NUM_PRIMARY, PRIMARY_DIM))

    def votes(self, u: Tensor) -> Tensor:
        """u_hat[b, i, j] = u[b, i] @ W[i, j]: (B, 16, 8) -> (B, 16, 10, 16)."""
        return torch.einsum("bnp,ncpd->bncd", u, self.W)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Self-attention routing of votes u_hat (B, N, C, D) in one pass: class capsules
        (B, C, D) and couplings c (B, N, C), a softmax over the C parents."""
        # sum_k A_j[i, k] = u_hat_ij . sum_k u_hat_kj: the row sums of the agreement in O(N), not O(N^2)
        agree = (u_hat * u_hat.sum(dim=1, keepdim=True)).sum(dim=-1) / math.sqrt(u_hat.shape[-1])  # (B, N, C)
        c = agree.softmax(dim=2)  # (B, N, C)
        s = ((c + self.b.squeeze(-1)).unsqueeze(-1) * u_hat).sum(dim=1)  # (B, C, D)
        return efficient_squash(s), c

    def uniform_route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """The vote attack's surrogate: class capsules squash(sum_i u_hat_ij / C) (B, C, D), every
        coupling 1/C (B, N, C), no prior."""
        B, N, C, _ = u_hat.shape
        c = u_hat.new_full((B, N, C), 1.0 / C)
        return efficient_squash(u_hat.sum(dim=1) / C), c

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        u_hat = self.votes(self.primary_capsules(x)).float()  # (B, 16, 10, 16); routed in fp32 under autocast
        v, c = self.uniform_route(u_hat) if self._uniform_votes else self.route(u_hat)  # (B, 10, 16), (B, 16, 10)
        lengths = v.norm(dim=-1)  # (B, 10)
        recon = None
        if self.decoder is not None:
            # Mask by the label while training, by the prediction otherwise.
            target = y if (self.training and y is not None) else lengths.argmax(dim=1)
            recon = self.decode(v, target)  # (B, 784)
        return ModelOutput(lengths, v, recon, c, None)

    @property
    def routes(self) -> bool:
        return True

    @contextlib.contextmanager
    def uniform_votes(self) -> Iterator[None]:
        """For the duration, class capsules squash(sum_i u_hat_ij / 10): uniform couplings, no
        prior (the vote attack's surrogate, Gu et al. 2021); the routing restored afterwards."""
        before, self._uniform_votes = self._uniform_votes, True
        try:
            yield
        finally:
            self._uniform_votes = before
