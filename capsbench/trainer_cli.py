"""`python -m capsbench train MODEL`: train one model (or fetch it from the cache)."""

from __future__ import annotations

import argparse
import time

from capsbench.config import parse_sets
from capsbench.device import describe, resolve_device
from capsbench.errors import CapsbenchError


def default_preset(device) -> str:
    return "full" if device.type == "cuda" else "quick"


def train_command(args: argparse.Namespace) -> int:
    from capsbench.models import MODELS
    from capsbench.train.cache import get_trained, model_folder
    from capsbench.train.config import train_config

    MODELS.get(args.model)  # unknown model: clear error before anything else
    device = resolve_device(args.device)
    sets = parse_sets(args.set)
    unknown = sorted(set(sets) - {"train", "model"})
    if unknown or any(not isinstance(v, dict) for v in sets.values()):
        raise CapsbenchError(f"--set keys must start with train. or model. (e.g. train.steps=500), got {unknown or list(sets)}")
    overrides = dict(sets.get("train", {}))
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.compile:
        overrides["compile"] = True
    preset = args.preset or default_preset(device)
    cfg = train_config(preset, **overrides)
    options = sets.get("model", {})
    print(f"train {args.model}: preset {preset}, {cfg.steps} steps x batch {cfg.batch_size}, "
          f"augment {cfg.augment}, seed {cfg.seed}, device {describe(device)}")  # fmt: skip
    t0 = time.perf_counter()
    tm = get_trained(args.model, cfg, device, options, root=args.data_dir, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    m = tm.meta
    how = "from the cache" if tm.cached else f"trained in {m['train_seconds']:.1f}s ({m['train_images_per_s']:.0f} img/s)"
    print(f"{args.model}: test accuracy {m['test_accuracy']:.4f} (n={m['test_n']}), {how}; wall {wall:.1f}s")
    print(model_folder(args.model, m["key"], args.data_dir))
    return 0
