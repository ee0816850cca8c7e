"""The class-conditional reconstruction detector (DARCCC: Frosst, Sabour & Hinton 2018; Qin et
al., ICLR 2020): flag an input when the L2 distance between it and its reconstruction from the
predicted class capsule is above a threshold, set on clean validation images at a stated false
positive rate. Reported against each attack: the detection rate among the successful
adversarial examples, the ROC AUC of clean vs successful adversarial images, and the success
rate that remains undetected."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from capsbench.models import BenchModel, predict
from capsbench.models.scoring import forward_batches, reconstruction_error
from capsbench.report.stats import roc_auc


def predict_and_error(model: BenchModel, x: Tensor, batch_size: int, dtype: torch.dtype | None) -> tuple[Tensor, Tensor | None]:
    """Predictions (N,) and, for a model that reconstructs, reconstruction errors (N,) fp32."""
    preds, errs = [], []
    for rows, out in forward_batches(model, x, batch_size, dtype):
        preds.append(predict(out))
        if model.reconstructs:
            errs.append(reconstruction_error(out, x[rows]))
    return torch.cat(preds), (torch.cat(errs) if errs else None)


@dataclass(frozen=True)
class Detector:
    threshold: float  # flag when the reconstruction error is above this
    val_n: int  # clean validation images it was set on
    val_fpr: float  # the share of them flagged (the target false-positive rate, up to ties)


def fit_detector(model: BenchModel, x_val: Tensor, fpr: float, batch_size: int, dtype: torch.dtype | None) -> Detector:
    """The threshold at the (1 - fpr) quantile of the clean validation images' errors."""
    _, err = predict_and_error(model, x_val, batch_size, dtype)
    assert err is not None, "fit_detector needs a model that reconstructs"
    threshold = float(torch.quantile(err.float(), 1 - fpr))
    return Detector(threshold, len(err), float((err > threshold).float().mean()))


def detection_row(det: Detector, clean_err: list[float], err: list[float], fooled: list[bool]) -> dict:
    """Counts and rates for one attack's images: ``err``/``fooled`` per image, ``clean_err`` the
    same images' clean errors (the negatives of the AUC)."""
    pos = [e for e, f in zip(err, fooled) if f]
    detected = sum(e > det.threshold for e in pos)
    n = len(err)
    return {
        "n": n, "fooled": len(pos), "detected": detected,
        "detection_rate": detected / len(pos) if pos else math.nan,
        "undetected": len(pos) - detected, "undetected_rate": (len(pos) - detected) / n if n else math.nan,
        "auc": roc_auc(clean_err, pos), "threshold": det.threshold, "val_n": det.val_n, "val_fpr": det.val_fpr,
        "clean_fpr": sum(e > det.threshold for e in clean_err) / len(clean_err) if clean_err else math.nan,
    }  # fmt: skip
