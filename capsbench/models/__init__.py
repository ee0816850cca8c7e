"""Model registry: ``build_model(name, **options)``; options override the model's config."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from capsbench.core.config import from_dict, weight_fields
from capsbench.models.base import BenchModel, ModelOutput, predict
from capsbench.models.capsnet import CapsNet, CapsNetConfig
from capsbench.models.cnn import POOLED_LAYERS, CNNConfig, paper_cnn, pooled_cnn
from capsbench.models.efficient_capsnet import EfficientCapsNet, EfficientCapsNetConfig
from capsbench.models.matrix_capsnet import MatrixCapsNet, MatrixCapsNetConfig
from capsbench.models.routing import dynamic_routing, squash
from capsbench.models.scoring import batch_predictions, batch_scores, count_correct, forward_batches
from capsbench.models.user import ModelRegistry

# A name it lacks is looked for among the user's models (models/user.py) before refusing.
MODELS: ModelRegistry = ModelRegistry("model")

MODELS.register(
    "capsnet",
    description="CapsNet, dynamic routing (Sabour et al. 2017): Conv1 256@9x9, PrimaryCaps 32x8D, "
    "DigitCaps 10x16D, 3 routing iterations, decoder 512-1024-784; margin + 0.0005 x recon SSE",
)((CapsNetConfig, CapsNet))
# One CapsNet per other routing head (models/heads), the same network with another ``routing``
# default: registry-level defaults, applied under the user's options by ``model_config``.
CAPSNET_HEADS = {
    "uniform": "couplings fixed at 1/C (no agreement; Paik et al. 2019's control)",
    "em": "EM routing on vector capsules (Hinton et al. 2018), a_i = |u_i|, learned beta_u, beta_a",
    "self": "self-routing (Hahn et al. 2019): each child's learned softmax of its own pose, no iteration",
    "attention": "one-pass self-attention routing (Efficient-CapsNet, Mazzia et al. 2021) + learned prior",
    "max-pool": "primary capsules max-pooled over the 6x6 grid per type, uniform couplings (control)",
    "avg-pool": "primary capsules averaged over the 6x6 grid per type, uniform couplings (control)",
}
for _head, _text in CAPSNET_HEADS.items():
    MODELS.register(f"capsnet-{_head}", description=f"CapsNet, {_text}", defaults={"routing": _head})(
        (CapsNetConfig, CapsNet)
    )
MODELS.register(
    "cnn-paper",
    description="The paper's baseline: conv 5x5 256-256-128, no pooling, FC 328-192, dropout; cross-entropy",
)((CNNConfig, paper_cnn))
MODELS.register(
    "cnn-pooled",
    description=f"Pooled CNN baseline of CapsNet's size: {POOLED_LAYERS}; cross-entropy",
)((CNNConfig, pooled_cnn))
MODELS.register(
    "efficient-capsnet",
    description="Efficient-CapsNet (Mazzia et al. 2021), 28x28 only: conv 32-64-64-128 + BN, depthwise PrimaryCaps "
    "16x8D, one-pass self-attention routing + learned prior, 10x16D, decoder 512-1024-784; 161,824 params "
    "without the decoder; margin + 0.0005 x recon SSE",
)((EfficientCapsNetConfig, EfficientCapsNet))
MODELS.register(
    "matrix-capsnet-em",
    description="Matrix capsules with EM routing (Hinton et al. 2018), A=B=C=D=32: Conv1 5x5/2, PrimaryCaps 4x4 "
    "pose + activation, ConvCaps 3x3/2 and 3x3/1, class capsules with coordinate addition, 3 EM iterations; "
    "318,964 params (paper: 310K); scores = class activations; spread loss, margin 0.2 -> 0.9",
)((MatrixCapsNetConfig, MatrixCapsNet))


def model_name(text: str) -> str:
    """The model's name for ``text``: a registered name, or a user's ``FILE.py:NAME`` registered
    now as ``FILE_STEM:NAME`` (models/user.py)."""
    return MODELS.name_of(text)


def model_config(name: str, **options: Any) -> Any:
    """The model's config dataclass with the registration's ``defaults`` and then ``options``
    applied (unknown options refused)."""
    cfg_cls, _ = MODELS.get(name, source=options.get("source"))  # a user's file: registered anew if need be
    defaults = MODELS.meta(name).get("defaults", {})  # e.g. capsnet-em's routing="em"
    return from_dict(cfg_cls, {**defaults, **options}, where=f"model {name}")


def build_model(name: str, **options: Any) -> BenchModel:
    """Build a registered model; e.g. ``build_model("capsnet", routing_iters=1)``."""
    cfg = model_config(name, **options)
    _, builder = MODELS.get(name)
    return builder(cfg)


def model_options(name: str, **options: Any) -> dict[str, Any]:
    """The resolved options as a plain dict (for configs and cache keys)."""
    return asdict(model_config(name, **options))


def weight_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that determine the model's function and weights: speed options (CapsNet's
    primary_conv, routing_impl, routing_chunk) left out, so a model trained with the spectral
    path is the same cached model as one trained with the direct path."""
    return weight_fields(model_config(name, **options))


__all__ = [
    "MODELS", "BenchModel", "ModelOutput", "CapsNet", "CapsNetConfig", "CNNConfig",
    "build_model", "model_name", "model_config", "model_options", "weight_options", "count_correct", "batch_scores", "batch_predictions", "forward_batches", "predict", "dynamic_routing", "squash",
]  # fmt: skip
