"""Model registry: ``build_model(name, **options)``; options override the model's config."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable

from capsbench.core.config import from_dict, weight_fields
from capsbench.core.registry import Registry
from capsbench.models.base import BenchModel, ModelOutput, predict
from capsbench.models.capsnet import CapsNet, CapsNetConfig, dynamic_routing, squash
from capsbench.models.cnn import POOLED_LAYERS, CNNConfig, paper_cnn, pooled_cnn
from capsbench.models.scoring import batch_predictions, batch_scores, count_correct, forward_batches

MODELS: Registry[tuple[type, Callable[[Any], BenchModel]]] = Registry("model")

MODELS.register(
    "capsnet",
    description="CapsNet, dynamic routing (Sabour et al. 2017): Conv1 256@9x9, PrimaryCaps 32x8D, "
    "DigitCaps 10x16D, 3 routing iterations, decoder 512-1024-784; margin + 0.0005 x recon SSE",
)((CapsNetConfig, CapsNet))
MODELS.register(
    "cnn-paper",
    description="The paper's baseline: conv 5x5 256-256-128, no pooling, FC 328-192, dropout; cross-entropy",
)((CNNConfig, paper_cnn))
MODELS.register(
    "cnn-pooled",
    description=f"Pooled CNN baseline of CapsNet's size: {POOLED_LAYERS}; cross-entropy",
)((CNNConfig, pooled_cnn))


def model_config(name: str, **options: Any) -> Any:
    """The model's config dataclass with ``options`` applied (unknown options refused)."""
    cfg_cls, _ = MODELS.get(name)
    return from_dict(cfg_cls, options, where=f"model {name}")


def build_model(name: str, **options: Any) -> BenchModel:
    """Build a registered model; e.g. ``build_model("capsnet", routing_iters=1)``."""
    _, builder = MODELS.get(name)
    return builder(model_config(name, **options))


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
    "build_model", "model_config", "model_options", "weight_options", "count_correct", "batch_scores", "batch_predictions", "forward_batches", "predict", "dynamic_routing", "squash",
]  # fmt: skip
