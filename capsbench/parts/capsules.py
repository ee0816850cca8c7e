"""The capsules part: what CapsNet's class capsules encode and how they route (Sabour et al. 2017).

Reconstructions of correctly and wrongly classified test digits (decoder masked by the
prediction, as at test time), the dimension perturbation of the paper's Figure 4, and the
coupling coefficients of clean vs FGSM images. Models without class capsules and a decoder are
skipped with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from capsbench.attacks import FGSM
from capsbench.core.config import opt
from capsbench.core.device import autocast
from capsbench.models.capsule import CapsuleModel
from capsbench.models.base import eval_mode
from capsbench.models.scoring import forward_batches
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import checks_footer, markdown_table

STEPS = 5  # offsets -STEPS..STEPS x STEP: the paper's [-0.25, 0.25] in steps of 0.05
STEP = 0.05


@dataclass(frozen=True)
class CapsulesConfig:
    n: int = opt(500, ge=1)  # test images searched for correct / wrong examples (the first n)
    examples: int = opt(8, ge=1)  # correct and wrong examples in the reconstruction figure (each)
    perturb_digits: int = opt(3, ge=1)  # correctly classified digits in the perturbation figure
    routing_examples: int = opt(3, ge=1)  # test images whose coupling is shown, clean vs FGSM
    routing_eps: float = opt(0.1, ge=0, le=1)  # FGSM eps (L-inf, pixel units) for the routing comparison
    batch_size: int = opt(250, ge=1)


def offsets() -> Tensor:
    """The 11 offsets -0.25, -0.20, ..., 0.25 (integer steps: no float drift; index STEPS is 0)."""
    return torch.arange(-STEPS, STEPS + 1) * STEP


@dataclass
class Evaluated:
    """One CapsNet on the first n test images (decoder masked by the prediction)."""

    x: Tensor  # (n, 1, S, S) inputs in [0, 1]
    y: Tensor  # (n,) labels
    pred: Tensor  # (n,) predictions
    recon: Tensor  # (n, S*S) fp32 reconstructions
    sse: Tensor  # (n,) per-image sum of squared reconstruction errors
    coupling_dev: float  # max |sum_j c_ij - 1| over every child of every image


def evaluate(ctx: RunContext, model: CapsuleModel, x: Tensor, y: Tensor, batch_size: int) -> Evaluated:
    preds, recons, devs = [], [], []
    for _, out in forward_batches(model, x, batch_size, ctx.dtype):
        preds.append(out.scores.argmax(1))
        recons.append(out.reconstruction.float())
        devs.append((out.coupling.float().sum(2) - 1).abs().amax())  # c: (B, N, C)
    recon = torch.cat(recons)
    sse = ((recon - x.flatten(1)) ** 2).sum(1)
    return Evaluated(x, y, torch.cat(preds), recon, sse, torch.stack(devs).max().item())


@torch.no_grad()
def perturbations(model: CapsuleModel, capsules: Tensor, target: Tensor) -> Tensor:
    """Figure 4: decode capsule ``target`` (K,) of ``capsules`` (K, C, D) with one dimension at a
    time shifted by each offset, in fp32. Returns (K, D, 11, S*S); [:, :, STEPS] is unshifted."""
    K, C, D = capsules.shape
    off = offsets().to(capsules.device)
    delta = torch.eye(D, device=capsules.device)[:, None, :] * off[None, :, None]  # (D, 11, D)
    onehot = F.one_hot(target, C).float()  # (K, C): shift the target capsule only
    shift = onehot[:, None, None, :, None] * delta[None, :, :, None, :]  # (K, D, 11, C, D)
    caps = capsules.float()[:, None, None] + shift
    with eval_mode(model):
        imgs = model.decode(caps.flatten(0, 2), target.repeat_interleave(D * len(off)))
    return imgs.view(K, D, len(off), -1)


@torch.no_grad()
def routing(ctx: RunContext, model: CapsuleModel, x: Tensor, y: Tensor, cfg: CapsulesConfig) -> dict[str, tuple]:
    """condition -> (images (k, 1, S, S), predictions (k,), coupling (k, N, C)), clean and FGSM."""
    adv = FGSM(model, cfg.routing_eps, ctx.dtype, cfg.batch_size)(x, y)  # the model's own attack loss
    out = {}
    with eval_mode(model), autocast(ctx.device, ctx.dtype):
        for cond, imgs in (("clean", x), ("adversarial", adv)):
            o = model(imgs)
            out[cond] = (imgs, o.scores.argmax(1), o.coupling.float())
    return out


def routing_rows(name: str, runs: dict, y: Tensor, eps: float, seed: int) -> list[dict]:
    """Flat rows per (example, condition): mean coupling to the label and predicted class, and the
    mean entropy (nats) of each child's coupling distribution over parents (max log C)."""
    rows = []
    idx = torch.arange(len(y), device=y.device)
    for cond, (_, pred, c) in runs.items():
        per_class = c.mean(1)  # (k, C)
        entropy = torch.special.entr(c).sum(2).mean(1)  # (k,)
        cols = (y, pred, per_class[idx, y], per_class[idx, pred], entropy)
        for j, (label, p, to_label, to_pred, h) in enumerate(zip(*(t.tolist() for t in cols))):
            rows.append({"model": name, "example": j, "condition": cond, "eps": eps if cond == "adversarial" else 0.0,
                         "label": label, "prediction": p, "coupling_label": to_label, "coupling_pred": to_pred,
                         "coupling_entropy": h, "seed": seed})  # fmt: skip
    return rows


def recon_rows(name: str, ev: Evaluated, seed: int) -> list[dict]:
    ok = ev.pred == ev.y
    return [{"model": name, "kind": kind, "n": int(m.sum()),
             "mean_sse": ev.sse[m].mean().item() if m.any() else math.nan, "seed": seed}
            for kind, m in (("correct", ok), ("wrong", ~ok))]  # fmt: skip


# ---- figures ------------------------------------------------------------------------------


def _image(ax, img: Tensor | np.ndarray, title: str = "") -> None:
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#4a7ab5")  # NaN: mosaic separators
    ax.imshow(img.cpu().numpy() if isinstance(img, Tensor) else img, cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def reconstructions_figure(name: str, ev: Evaluated, k: int) -> Figure:
    """Rows: input and reconstruction for the first k correct, then the first k wrong images."""
    S = ev.x.shape[-1]
    ok = ev.pred == ev.y
    fig = Figure(figsize=(1.3 * k + 1.2, 6.2))
    axes = fig.subplots(4, k, squeeze=False)
    for block, (kind, mask) in enumerate((("correct", ok), ("wrong", ~ok))):
        chosen = mask.nonzero().flatten()[:k].tolist()
        for c in range(k):
            top, bottom = axes[2 * block][c], axes[2 * block + 1][c]
            if c >= len(chosen):
                top.axis("off"), bottom.axis("off")
                continue
            i = chosen[c]
            _image(top, ev.x[i, 0], f"#{i} label {ev.y[i].item()}, pred {ev.pred[i].item()}")
            _image(bottom, ev.recon[i].view(S, S), f"decoded from {ev.pred[i].item()}")
        axes[2 * block][0].set_ylabel(f"{kind}: input", fontsize=8)
        axes[2 * block + 1][0].set_ylabel(f"{kind}: reconstruction", fontsize=8)
        if not chosen:
            msg = f"no {kind} predictions among the first {len(ev.y)} test images"
            axes[2 * block][0].text(0, 0.5, msg, fontsize=9, transform=axes[2 * block][0].transAxes)
    fig.suptitle(f"{name}: test inputs and their reconstructions from the predicted class capsule "
                 f"(first {k} correct and first {k} wrong of {len(ev.y)})", fontsize=10)  # fmt: skip
    return fig


def tile(imgs: Tensor, pad: float = math.nan) -> np.ndarray:
    """(R, K, S, S) images -> one (R*(S+1)-1, K*(S+1)-1) mosaic with 1-px separators (NaN)."""
    R, K, S, _ = imgs.shape
    padded = F.pad(imgs, (0, 1, 0, 1), value=pad)  # (R, K, S+1, S+1)
    return padded.permute(0, 2, 1, 3).reshape(R * (S + 1), K * (S + 1))[:-1, :-1].cpu().numpy()


def perturbation_figure(name: str, grid: Tensor, idx: list[int], labels: list[int], targets: list[int]) -> Figure:
    """One mosaic per digit: rows = capsule dimension, columns = offset added to it."""
    K, D, T, _ = grid.shape
    S = math.isqrt(grid.shape[-1])
    fig = Figure(figsize=(max(3.2 * K + 0.6, 6.0), 2.6 * D / T + 1.6), layout="constrained")  # panels ~ D:T tall
    off = offsets().tolist()
    for ax, g, i, lab, t in zip(fig.subplots(1, K, squeeze=False)[0], grid, idx, labels, targets):
        _image(ax, tile(g.view(D, T, S, S)), f"test #{i}: label {lab}, capsule {t}")
        ax.set_xticks([j * (S + 1) + S / 2 for j in range(T)], [f"{o:+.2f}" for o in off], fontsize=6, rotation=90)
        ax.set_yticks([d * (S + 1) + S / 2 for d in range(D)], [str(d) for d in range(D)], fontsize=6)
        ax.set(xlabel="offset added to the dimension", ylabel="capsule dimension")
    fig.suptitle(f"{name}: the winning capsule with one of its {D} dimensions shifted by -0.25..0.25 (step 0.05),\n"
                 "then decoded (Sabour et al. 2017, Fig. 4); centre column = the reconstruction",
                 fontsize=9)  # fmt: skip
    return fig


def routing_figure(name: str, runs: dict, y: Tensor, types: int, eps: float) -> Figure:
    """Per example: clean and FGSM images, mean coupling per parent, and G x G maps of the
    coupling to the true class (mean over primary capsule types)."""
    k = len(y)
    fig = Figure(figsize=(14, 2.6 * k + 0.6), layout="constrained")
    axes = fig.subplots(k, 5, squeeze=False)
    maps = {}
    for cond, (_, _, c) in runs.items():
        to_label = (c * F.one_hot(y, c.shape[2])[:, None]).sum(2)  # (k, N)
        G = math.isqrt(c.shape[1] // types)
        maps[cond] = to_label.view(k, types, G, G).mean(1).cpu().numpy()  # N ordered (type, row, col)
    for j, row in enumerate(axes):
        label = y[j].item()
        for ax, cond in zip(row[:2], runs):
            _image(ax, runs[cond][0][j, 0], f"{cond}: label {label}, pred {runs[cond][1][j].item()}")
        bar_chart(row[2], runs, j, label)
        vmax = max(m[j].max() for m in maps.values())
        for ax, cond in zip(row[3:], runs):
            im = ax.imshow(maps[cond][j], cmap="viridis", vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{cond}: coupling to class {label}", fontsize=7)
        fig.colorbar(im, ax=row[3:], shrink=0.8)
    fig.suptitle(f"{name}: coupling coefficients after routing, clean vs FGSM eps={eps:g} (L-inf); maps are "
                 "primary-capsule positions, mean over capsule types", fontsize=9)  # fmt: skip
    return fig


def bar_chart(ax, runs: dict, j: int, label: int) -> None:
    """Mean coupling of example j's children to each parent class, clean vs adversarial."""
    for shift, (cond, (_, _, c)) in zip((-0.2, 0.2), runs.items()):
        means = c[j].mean(0).cpu().numpy()  # (C,)
        ax.bar(np.arange(len(means)) + shift, means, width=0.4, label=cond)
    ax.axhline(1 / len(means), color="gray", linestyle=":", linewidth=1, label="uniform")
    ax.set_xticks(range(len(means)))
    ax.tick_params(labelsize=7)
    ax.set_title(f"mean coupling per parent class (label {label})", fontsize=7)
    ax.legend(fontsize=6)


# ---- the part -----------------------------------------------------------------------------


def perturbation_part(name: str, model: CapsuleModel, x: Tensor, y: Tensor, chosen: Tensor) -> tuple[Figure, Check]:
    """Figure 4 for the ``chosen`` test digits, and the check that offset 0 is the reconstruction."""
    with torch.no_grad(), eval_mode(model):
        out = model(x[chosen])  # fp32, no autocast: the zero-offset check is exact
    target = out.scores.argmax(1)
    grid = perturbations(model, out.capsules, target)  # (K, D, 11, S*S)
    diff = (grid[:, :, STEPS] - out.reconstruction[:, None]).abs().max().item()
    check = Check(f"{name}: zero-offset perturbation equals the reconstruction", diff < 1e-5,
                  f"max |diff| = {diff:.2e} over {len(chosen)} digits x {grid.shape[1]} dimensions (fp32)")  # fmt: skip
    return perturbation_figure(name, grid, chosen.tolist(), y[chosen].tolist(), target.tolist()), check


def model_part(ctx: RunContext, cfg: CapsulesConfig, name: str, model: CapsuleModel, x: Tensor, y: Tensor) -> PartResult:
    """Tables, figures, checks and notes of one CapsNet with a decoder."""
    ev = evaluate(ctx, model, x, y, cfg.batch_size)
    res = PartResult(figures={f"capsules_reconstructions_{name}": reconstructions_figure(name, ev, cfg.examples)})
    res.tables["capsules_reconstruction"] = pd.DataFrame(recon_rows(name, ev, ctx.seed),
                                                         columns=CAPSULES_TABLES["capsules_reconstruction"])
    chosen = (ev.pred == ev.y).nonzero().flatten()[: cfg.perturb_digits]
    if len(chosen):
        res.figures[f"capsules_perturbation_{name}"], check = perturbation_part(name, model, x, y, chosen)
        res.checks.append(check)
    else:
        res.summary = f"{name}: no correctly classified image among the first {len(y)}, so no perturbation figure."
    k = min(cfg.routing_examples, len(y))
    runs = routing(ctx, model, x[:k], y[:k], cfg)
    res.tables["capsules_routing"] = pd.DataFrame(routing_rows(name, runs, y[:k], cfg.routing_eps, ctx.seed),
                                                  columns=CAPSULES_TABLES["capsules_routing"])
    if model.primary_layout is not None:  # coupling maps need children laid out types x grid x grid
        types = model.primary_layout[0]
        res.figures[f"capsules_routing_{name}"] = routing_figure(name, runs, y[:k], types, cfg.routing_eps)
    dev = max([ev.coupling_dev] + [(c.sum(2) - 1).abs().max().item() for _, _, c in runs.values()])
    res.checks.append(Check(f"{name}: coupling coefficients sum to 1 over parents", dev < 1e-4,
                            f"max |sum_j c_ij - 1| = {dev:.2e} over {len(y)} clean and {k} FGSM images"))  # fmt: skip
    return res


CAPSULES_TABLES = {
    "capsules_reconstruction": ("model", "kind", "n", "mean_sse", "seed"),
    "capsules_routing": ("model", "example", "condition", "eps", "label", "prediction", "coupling_label",
                         "coupling_pred", "coupling_entropy", "seed"),
}


@part("capsules", CapsulesConfig, CAPSULES_TABLES)
def run_capsules(ctx: RunContext, cfg: CapsulesConfig) -> PartResult:
    n = min(cfg.n, len(ctx.test_x))
    x, y = ctx.test_inputs(ctx.test_x[:n]), ctx.test_y[:n]
    total, frames, notes = PartResult(), {}, []
    for name, tm in ctx.models.items():
        if not (isinstance(tm.model, CapsuleModel) and tm.model.reconstructs and tm.model.routes):
            notes.append(f"{name}: skipped (no class capsules with a decoder and routing).")
            continue
        res = model_part(ctx, cfg, name, tm.model, x, y)
        total.figures.update(res.figures)
        total.checks += res.checks
        notes += [res.summary] if res.summary else []
        for key, df in res.tables.items():
            frames.setdefault(key, []).append(df)
    total.tables = {key: pd.concat(dfs, ignore_index=True) for key, dfs in frames.items()}
    total.summary = summary(total, cfg, n, notes)
    return total


FIGURES_NOTE = """What the class capsules encode and how they route, on the first {n} test images.

- `capsules_reconstructions_<model>`: inputs and the decoder's reconstruction from the predicted class capsule (as at \
test time) for the first {cfg.examples} correctly and wrongly classified images.
- `capsules_perturbation_<model>` (the paper's Figure 4): for up to {cfg.perturb_digits} correctly classified digits, \
each row adds -0.25, -0.20, ..., 0.25 to one dimension of the winning capsule (other capsules masked to zero) and \
decodes it; the centre column is the unperturbed reconstruction.
- `capsules_routing_<model>`: coupling coefficients after routing for the first {cfg.routing_examples} test images, \
clean vs FGSM at eps={cfg.routing_eps:g} (L-inf, the model's own margin loss): mean coupling to each parent class, and \
maps of the coupling to the true class over primary-capsule positions (mean over capsule types).
"""


def summary(res: PartResult, cfg: CapsulesConfig, n: int, notes: list[str]) -> str:
    out = ["## Capsules", ""]
    notes = [f"- {note}" for note in notes] + [""] if notes else []
    if not res.tables:
        return "\n".join(out + ["No model has class capsules and a decoder; nothing to show.", ""] + notes)
    recon = res.tables["capsules_reconstruction"]
    out += [FIGURES_NOTE.format(n=n, cfg=cfg), "**Reconstruction error**: mean per-image sum of squared pixel errors, "
            "decoder masked by the prediction", "", markdown_table(recon), ""]  # fmt: skip
    no_wrong = recon[(recon.kind == "wrong") & (recon.n == 0)].model.tolist()
    if no_wrong:
        out += [f"No wrong predictions among these images for: {', '.join(no_wrong)} (figure: correct ones only).", ""]
    out += ["**Routing**: mean coupling of the children to the label and predicted class, and the mean entropy "
            f"(nats, max log 10 = {math.log(10):.3f}) of each child's coupling over parents", "",
            markdown_table(res.tables["capsules_routing"]), ""]  # fmt: skip
    out += checks_footer(res.checks)
    return "\n".join(out + [""] + notes)
