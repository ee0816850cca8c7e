"""CapsNet with dynamic routing (Sabour, Frosst & Hinton, NIPS 2017, arXiv 1710.09829).

Exactly the paper's MNIST network: 8,215,568 parameters at 28x28 with the decoder,
6,804,224 without it (see shared/capsnet-facts.md). Loss in the paper's form: margin loss
summed over classes plus 0.0005 x the per-image sum of squared reconstruction errors.
The ``routing`` option swaps the routing between the votes and the class capsules for another
head of ``models/heads`` (EM, self-routing, attention, uniform, pooling); dynamic by default.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.models import spectral
from capsbench.models.base import ModelOutput
from capsbench.models.capsule import CapsuleModel
from capsbench.models.heads import HEADS, HeadSpec, Routed, build_head
from capsbench.models.heads.uniform import UniformHead
from capsbench.models.routing import squash

PrimaryConv = Literal["auto", "direct", "spectral"]
RoutingImpl = Literal["auto", "plain", "parent-major"]
CPU_ROUTING_CHUNK = 8  # examples routed at a time on a CPU: u_hat (8 x 1152 x 10 x 16 fp32, 5.9 MB) stays in cache


@dataclass(frozen=True)
class CapsNetConfig:
    input_size: int = 28  # 28 (MNIST) or 40 (affNIST canvas); primary capsules follow
    in_channels: int = opt(1, ge=1)
    num_classes: int = opt(10, ge=2)
    conv_channels: int = opt(256, ge=1)
    primary_types: int = opt(32, ge=1)
    primary_dim: int = opt(8, ge=1)
    class_dim: int = opt(16, ge=1)
    routing_iters: int = opt(3, ge=1)
    # The routing head (models/heads): in the cache key only when not "dynamic", so CapsNets
    # cached before heads existed keep their key.
    routing: str = opt("dynamic", keyed="unless-default")
    reconstruction: bool = True
    inner_routing_grad: bool = True  # official code backpropagates through every iteration
    # Speed options (in_key=False: the same function and weights, so the same cached model):
    # Examples routed at a time: 0 = auto, CPU_ROUTING_CHUNK on a CPU (cache-sized pieces, ~2-3x
    # faster routing there) and the whole batch on a GPU (one large kernel per step).
    routing_chunk: int = opt(0, ge=0, in_key=False)
    # How Conv1 + PrimaryCaps are computed: "direct" (F.conv2d), "spectral" (PrimaryCaps in the
    # frequency domain, ~4x fewer multiply-adds; see models/spectral.py), or "auto": spectral for
    # CPU training and inference (fp32, or bf16 autocast with bf16 products), direct on a GPU
    # (cuDNN), under other autocast and when the input needs a gradient (attacks), unless
    # ``allow_fast_input_grads`` (iterative attacks, fp32 only).
    primary_conv: PrimaryConv = opt("auto", in_key=False)
    # How routing is computed: "plain" (broadcast multiply-and-sum over (B, N, C, D) predictions,
    # differentiated by autograd; torch.compile fuses it on a GPU), "parent-major" ((B, C, N, D)
    # predictions, batched matrix-vector products and a hand-written backward; see
    # models/routing.py), or "auto": parent-major where "auto" primary_conv picks spectral (see
    # cpu_fast_path), plain elsewhere.
    routing_impl: RoutingImpl = opt("auto", in_key=False)
    recon_weight: float = opt(0.0005, ge=0)
    decoder_hidden: tuple[int, int] = opt((512, 1024), ge=1)
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = opt(0.5, ge=0)

    def validate(self, where: str = "") -> None:
        if self.routing not in HEADS:
            prefix = f"{where}." if where else ""
            raise CapsbenchError(f"{prefix}routing: unknown routing head {self.routing!r}; "
                                 f"known heads: {', '.join(HEADS.names())}")  # fmt: skip

    @property
    def primary_grid(self) -> int:
        conv1 = self.input_size - 8  # 9x9 valid conv, stride 1
        return (conv1 - 9) // 2 + 1  # 9x9 valid conv, stride 2

    @property
    def num_primary(self) -> int:
        return self.primary_grid**2 * self.primary_types


def cpu_fast_path(x: Tensor, input_grads: bool = False) -> bool:
    """Whether the "auto" options take the CPU fast paths for input x: fp32 on a CPU (GPUs keep
    cuDNN and compiled routing), without autocast or under bf16 autocast (training where the CPU
    multiplies bf16 natively: the spectral products then run in bf16), and no input gradient
    unless ``input_grads`` (the model's ``allow_fast_input_grads``: iterative attacks, in fp32
    only). Single-step attacks keep the plain paths: a fast path's rounding (~1e-6 of the largest
    gradient) could flip the sign of a near-zero pixel gradient, and FGSM moves every pixel by eps."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and not x.requires_grad
    return input_grads or not x.requires_grad


class _ReachedPixels(torch.autograd.Function):
    """Identity on x (B, Cin, S, S); its gradient is set to exactly zero at the pixels that no
    live Conv1 unit inside PrimaryCaps' windows reaches, as the direct convolution's gradient is.
    The spectral path's circular transforms give some of them rounding noise instead (~1e-6 of
    the largest entry, through the Conv1 units of the last row and column, which no stride-2
    window covers), whose sign an attack would follow."""

    @staticmethod
    def forward(ctx, x: Tensor, conv1: nn.Conv2d, covered: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.conv1, ctx.covered = conv1, covered
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * _reached(x, ctx.conv1, ctx.covered), None, None


def _reached(x: Tensor, conv1: nn.Conv2d, covered: int) -> Tensor:
    """(B, 1, S, S) bool: the pixels of x (B, Cin, S, S) in the window of at least one live
    (positive) Conv1 unit among the first ``covered`` rows and columns."""
    k, B = conv1.kernel_size[0], x.shape[0]
    side = covered + k - 1
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # Conv1 as one GEMM (faster here than F.conv2d)
        cols = F.unfold(x[..., :side, :side], k).transpose(1, 2).flatten(0, 1)  # (B * covered^2, Cin*k*k)
        pre = torch.addmm(conv1.bias, cols, conv1.weight.flatten(1).t())  # (B * covered^2, C)
        live = (pre.amax(dim=1) > 0).to(x.dtype).view(B, 1, covered, covered)
        reached = F.max_pool2d(F.pad(live, (k - 1,) * 4), k, stride=1) > 0  # (B, 1, side, side)
    return F.pad(reached, (0, x.shape[-1] - side, 0, x.shape[-2] - side))


class CapsNet(CapsuleModel):
    """Conv1 -> PrimaryCaps -> DigitCaps (votes W, then the routing head) -> optional decoder."""

    def __init__(self, cfg: CapsNetConfig) -> None:
        super().__init__()
        if cfg.primary_grid < 1:
            raise ValueError(f"input_size {cfg.input_size} is too small for CapsNet (needs >= 25)")
        if cfg.primary_conv == "spectral" and not spectral.supports(cfg.input_size - 8, 9, 2):
            raise ValueError(f"primary_conv='spectral' needs an even Conv1 output (input_size 28 or 40), "
                             f"got input_size {cfg.input_size}")  # fmt: skip
        self.cfg = cfg
        self.input_size = cfg.input_size
        self.num_classes = cfg.num_classes
        self.class_dim, self.recon_weight = cfg.class_dim, cfg.recon_weight
        self.m_plus, self.m_minus, self.lambda_ = cfg.m_plus, cfg.m_minus, cfg.lambda_
        self.primary_layout = (cfg.primary_types, cfg.primary_grid)
        self.conv1 = nn.Conv2d(cfg.in_channels, cfg.conv_channels, 9)
        self.primary = nn.Conv2d(cfg.conv_channels, cfg.primary_types * cfg.primary_dim, 9, stride=2)
        # The head owns its own parameters (none for dynamic: the state-dict keys stay W, conv1,
        # primary, decoder) and draws no random numbers, so W is the same for the same seed.
        spec = HeadSpec(cfg.num_primary, cfg.num_classes, cfg.class_dim, cfg.primary_dim, cfg.routing_iters,
                        cfg.inner_routing_grad, self.primary_layout)  # fmt: skip
        self.head = build_head(cfg.routing, spec)
        # One 8x16 matrix per (child capsule, parent class), stored (children, C, D_out, D_in);
        # children = N, or the capsule types for the pooling heads.
        votes = (self.head.num_children, cfg.num_classes, cfg.class_dim, cfg.primary_dim)
        self.W = nn.Parameter(0.01 * torch.randn(votes))
        self._uniform_votes = False  # set by uniform_votes()
        self.decoder = self._decoder(cfg) if cfg.reconstruction else None
        self._spectra: tuple | None = None  # (key, PrimaryCaps weight spectra) for inference

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
        if self.use_spectral(x):
            xs = _ReachedPixels.apply(x, self.conv1, self.covered_side()) if x.requires_grad else x
            p = spectral.spectral_primary(xs, self.conv1, self.primary, self.cached_spectra(x))
        else:
            p = self.primary(F.relu(self.conv1(x)))  # (B, 32*8, G, G), channel = type*8 + dim
        B, _, G, _ = p.shape
        # (B, 32, 8, G, G) -> (B, 32, G, G, 8) -> (B, N, 8): capsule index = (type, row, col)
        p = p.reshape(B, cfg.primary_types, cfg.primary_dim, G, G).permute(0, 1, 3, 4, 2)
        return squash(p.reshape(B, -1, cfg.primary_dim))

    def covered_side(self) -> int:
        """Rows (and columns) of Conv1's output that PrimaryCaps' valid stride-2 windows cover
        (19 of 20 at 28x28: the last row and column feed no capsule)."""
        return (self.cfg.primary_grid - 1) * self.primary.stride[0] + self.primary.kernel_size[0]

    def use_spectral(self, x: Tensor) -> bool:
        mode = self.cfg.primary_conv
        if mode == "auto":
            mode = "spectral" if cpu_fast_path(x, self.allow_fast_input_grads) else "direct"
        return mode == "spectral" and spectral.supports(x.shape[-1] - 8, 9, 2)

    def use_parent_major(self, x: Tensor) -> bool:
        if not self.head.has_parent_major:
            return False
        mode = self.cfg.routing_impl
        return mode == "parent-major" or (mode == "auto" and cpu_fast_path(x, self.allow_fast_input_grads))

    def cached_spectra(self, x: Tensor) -> Tensor | None:
        """PrimaryCaps' weight spectra, kept while no gradient is recorded and the weight is
        unchanged (its version counter and storage), so inference pays for them once."""
        w = self.primary.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self._spectra = None
            return None  # training or attacking: recomputed in the graph
        low = spectral.product_dtype(x)
        key = (w._version, w.data_ptr(), w.dtype, w.device, low, x.shape[-1])
        if self._spectra is None or self._spectra[0] != key:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                self._spectra = (key, spectral.weight_spectra(w.to(low), spectral.phase_side(x.shape[-1])))
        return self._spectra[1]

    def predictions(self, u: Tensor, w: Tensor | None = None) -> Tensor:
        """u_hat[b, n, c] = W[n, c] @ u[b, n] as one batched matmul over the N children;
        ``w`` may pass ``prediction_weights()`` computed once for several calls."""
        N, C, D, _ = self.W.shape
        B = u.shape[0]
        w = self.prediction_weights() if w is None else w  # (N, 8, C*16)
        u_hat = torch.bmm(u.transpose(0, 1), w)  # (N, B, C*16)
        return u_hat.view(N, B, C, D).transpose(0, 1)  # (B, N, C, 16)

    def prediction_weights(self) -> Tensor:
        N, C, D, P = self.W.shape
        return self.W.permute(0, 3, 1, 2).reshape(N, P, C * D)  # (N, 8, C*16), a copy

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        u = self.primary_capsules(x)  # (B, N, 8)
        v, c, b = self.route(u, self.use_parent_major(x))
        lengths = v.norm(dim=-1)  # (B, C)
        recon = None
        if self.decoder is not None:
            # Mask by the label while training, by the prediction otherwise.
            target = y if (self.training and y is not None) else lengths.argmax(dim=1)
            recon = self.decode(v, target)
        return ModelOutput(lengths, v, recon, c, b)

    def route(self, u: Tensor, parent_major: bool = False) -> Routed:
        """Votes and routing (in fp32) for primary capsules u (B, N, 8), in chunks of
        ``routing_chunk`` examples (each example is routed on its own either way), by the
        routing head (the uniform one inside ``uniform_votes``); ``parent_major`` asks the
        dynamic head for its CPU formulation."""
        cfg = self.cfg
        head = UniformHead(self.head.spec) if self._uniform_votes else self.head  # no parameters: built per call
        u = self.head.child_capsules(u)  # (B, children, 8): pooled for the pooling heads
        chunk = cfg.routing_chunk or (CPU_ROUTING_CHUNK if u.device.type == "cpu" else len(u))
        w = self.prediction_weights()  # one copy (and one gradient) for every chunk
        parts = []
        for p in u.split(chunk):  # split, not slicing: a slice's backward allocates a full-batch gradient per chunk
            u_hat = self.predictions(p, w).float()  # (b, N, C, D), a view of (N, b, C, D)
            parts.append(head(u_hat, p, parent_major))
        if len(parts) == 1:
            return parts[0]
        return Routed(*(None if t[0] is None else torch.cat(t) for t in zip(*parts)))

    @property
    def routes(self) -> bool:
        return self.head.routes

    @contextlib.contextmanager
    def uniform_votes(self) -> Iterator[None]:
        """For the duration, class capsules from the uniform head on the same votes (the vote
        attack's surrogate, Gu, Wu & Tresp 2021); the model's own head afterwards, even on errors."""
        before, self._uniform_votes = self._uniform_votes, True
        try:
            yield
        finally:
            self._uniform_votes = before

    def nominal(self) -> CapsNet:
        """The direct convolution for counting MACs: the spectral PrimaryCaps runs fewer
        multiply-adds than the convolution it equals."""
        if self.cfg.primary_conv == "direct":
            return self
        direct = copy.deepcopy(self)
        direct.cfg = dataclasses.replace(self.cfg, primary_conv="direct")
        return direct
