"""Timing recipe, MAC counting, and the throughput part on two tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from capsbench.core.config import from_dict
from capsbench.core.device import amp_dtype, dtype_label
from capsbench.core.errors import CapsbenchError
from capsbench.core.timing import count_macs, peak_memory_mb, summarize, time_fn
from capsbench.models import BenchModel, ModelOutput, build_model
from capsbench.parts.base import RunContext
from capsbench.parts.throughput import (
    COLUMNS,
    ROUTING_COLUMNS,
    Budget,
    ThroughputConfig,
    run_throughput,
    with_routing_iters,
)  # fmt: skip
from capsbench.train.config import TrainConfig

CPU = torch.device("cpu")
TINY_CAPSNET = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": [16, 32]}


class TinyCNN(BenchModel):
    """A non-capsule model: conv 3x3 (4) -> 4x4 average pool -> FC 10; cross-entropy.
    Raises an out-of-memory error for batches above ``max_batch`` (to test the OOM path)."""

    loss_name = "cross-entropy"

    def __init__(self, max_batch: int = 10**9) -> None:
        super().__init__()
        self.input_size, self.num_classes, self.max_batch = 28, 10, max_batch
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 7 * 7, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        if x.shape[0] > self.max_batch:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return ModelOutput(self.fc(F.avg_pool2d(F.relu(self.conv(x)), 4).flatten(1)))

    def objective(self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.scores, y)


def tiny_context(cnn: BenchModel | None = None) -> RunContext:
    torch.manual_seed(0)
    caps = build_model("capsnet", **TINY_CAPSNET).eval()
    cnn = (cnn or TinyCNN()).eval()
    models = {
        "capsnet": SimpleNamespace(model=caps, meta={"model": "capsnet", "options": TINY_CAPSNET, "params": caps.num_params()}),
        "tiny-cnn": SimpleNamespace(model=cnn, meta={"params": cnn.num_params()}),
    }  # fmt: skip
    x = torch.zeros(8, 28, 28, dtype=torch.uint8)
    return RunContext(models=models, test_x=x, test_y=torch.zeros(8, dtype=torch.long), train_cfg=TrainConfig(augment="none"),
                      device=CPU, dtype=None, seed=0, progress=False)  # fmt: skip


def small_cfg(**kw) -> ThroughputConfig:
    base = {"batch_sizes": [2, 4], "repeats": 2, "warmup": 1, "routing_iters": [1, 2], "routing_batch_size": 4}
    return from_dict(ThroughputConfig, {**base, **kw}, where="throughput")


def test_time_fn_returns_one_positive_time_per_repeat():
    calls = []
    times = time_fn(lambda: calls.append(sum(range(1000))), warmup=2, repeats=5, device=CPU)
    assert len(times) == 5 and all(isinstance(t, float) and t > 0 for t in times)
    assert len(calls) == 7  # warm-up calls run but are not timed


def test_summarize_known_values():
    s = summarize([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"]) == (3.0, 2.0, 4.0, 2.0)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert (s["median"], s["q1"], s["q3"], s["iqr"]) == (2.5, 1.75, 3.25, 1.5)
    assert s["q1"] == np.percentile([1, 2, 3, 4], 25)  # the same convention as numpy
    assert summarize([0.5]) == {"median": 0.5, "iqr": 0.0, "q1": 0.5, "q3": 0.5}


def test_count_macs_hand_computed():
    assert count_macs(nn.Linear(10, 20), torch.rand(3, 10)) == 3 * 10 * 20
    conv = nn.Conv2d(2, 4, 3)  # 8x8 -> 6x6 output, 4 channels, each a 2x3x3 dot product
    assert count_macs(conv, torch.rand(1, 2, 8, 8)) == 6 * 6 * 4 * 2 * 3 * 3
    assert count_macs(conv, torch.rand(5, 2, 8, 8)) == 5 * 6 * 6 * 4 * 2 * 3 * 3


@pytest.mark.slow
def test_paper_capsnet_macs_match_the_facts_file():
    torch.manual_seed(0)
    model = build_model("capsnet").eval()  # the spectral PrimaryCaps on this CPU
    macs = count_macs(model.nominal(), torch.rand(1, 1, 28, 28))
    assert abs(macs / 203e6 - 1) < 0.10, macs
    assert model.cfg.primary_conv == "auto" and model.nominal().cfg.primary_conv == "direct"
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        model(x)  # the inference weight spectra, computed once and cached
    executed = count_macs(model, x) / 64
    assert executed < 0.4 * macs, executed  # what the spectral path runs: about a third


def test_peak_memory_is_nan_on_the_cpu():
    assert math.isnan(peak_memory_mb(CPU))


def test_routing_variant_keeps_the_weights():
    ctx = tiny_context()
    tm = ctx.models["capsnet"]
    x = torch.rand(3, 1, 28, 28)
    same = with_routing_iters("capsnet", tm, tm.model.cfg.routing_iters, CPU)
    assert torch.equal(same(x).scores, tm.model(x).scores)  # same weights, same routing: same output
    one = with_routing_iters("capsnet", tm, 1, CPU)
    assert one.cfg.routing_iters == 1 and not one.training
    assert not torch.equal(one(x).scores, tm.model(x).scores)


@pytest.mark.slow
def test_throughput_part_end_to_end_leaves_weights_untouched():
    ctx = tiny_context()
    before = {n: {k: v.clone() for k, v in tm.model.state_dict().items()} for n, tm in ctx.models.items()}
    res = run_throughput(ctx, small_cfg())
    df = res.tables["throughput"]
    assert list(df.columns) == COLUMNS
    assert len(df) == 2 * 2 * 2  # models x modes x batch sizes
    assert set(df["mode"]) == {"train", "inference"} and set(df.batch_size) == {2, 4}
    assert (df.samples_per_sec > 0).all() and (df.step_ms_iqr >= 0).all()
    assert np.allclose(df.samples_per_sec, df.batch_size / (df.step_ms_median / 1e3))
    assert df.peak_mem_mb.isna().all() and df.compile_s.isna().all() and not df["compile"].any()
    train_dtype = dtype_label(amp_dtype(CPU, "auto", training=True))  # bf16 where the CPU has bf16 instructions
    assert (df.dtype == df["mode"].map({"train": train_dtype, "inference": "fp32"})).all()
    assert (df.repeats == 2).all() and (df.seed == 0).all()
    caps, cnn = df[df.model == "capsnet"], df[df.model == "tiny-cnn"]
    assert (caps.routing_iters == 3).all() and cnn.routing_iters.isna().all()
    assert (cnn.macs_per_sample == 28 * 28 * 4 * 9 + 4 * 49 * 10).all()  # conv + FC, per image
    assert (caps.params == ctx.models["capsnet"].model.num_params()).all()
    routing = res.tables["throughput_routing"]
    assert list(routing.columns) == ROUTING_COLUMNS
    assert set(routing.model) == {"capsnet"} and sorted(routing.routing_iters) == [1, 1, 2, 2]
    assert set(res.figures) == {"throughput", "throughput_routing"}
    assert all(isinstance(f, Figure) and f.axes for f in res.figures.values())
    assert res.summary.startswith("## Throughput") and "routing iterations" in res.summary
    assert res.checks == []  # the tiny CapsNet is not the paper's configuration
    for n, tm in ctx.models.items():
        assert not tm.model.training
        for k, v in tm.model.state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)


def test_out_of_memory_batches_are_skipped_with_a_note():
    ctx = tiny_context(TinyCNN(max_batch=2))
    res = run_throughput(ctx, small_cfg(modes=["inference"], routing_iters=[1]))
    df = res.tables["throughput"]
    assert set(df[df.model == "tiny-cnn"].batch_size) == {2}
    assert set(df[df.model == "capsnet"].batch_size) == {2, 4}
    assert "tiny-cnn: out of memory, skipped: inference 4" in res.summary


@pytest.mark.slow
def test_failed_compile_falls_back_to_eager_with_one_notice(monkeypatch):
    def broken_compile(model, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("simulated inductor failure")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    ctx = tiny_context()
    res = run_throughput(ctx, small_cfg(compile=[True], modes=["inference"], routing_iters=[1]))
    df = res.tables["throughput"]
    assert len(df) == 4 and not df["compile"].any() and df.compile_s.isna().all()
    assert res.summary.count("torch.compile failed") == 2  # one notice per model
    both = run_throughput(ctx, small_cfg(compile=[False, True], modes=["inference"], routing_iters=[1]))
    assert len(both.tables["throughput"]) == 4  # no duplicate eager rows


def test_budget_skips_settings_projected_to_overrun():
    b = Budget(seconds=1.0, steps=10)
    assert b.allows("train", 512)  # nothing measured yet: no projection
    b.record("train", batch=2, step_ms=100.0)  # 0.05 s per image
    assert b.allows("train", 1) and not b.allows("train", 4)  # 0.5 s vs 2 s for 10 steps
    assert b.allows("inference", 4)
    res = run_throughput(tiny_context(), small_cfg(max_seconds=1e-9))
    assert res.tables["throughput"].empty and "throughput" not in res.figures
    assert "skipped (max_seconds = 1e-09" in res.summary


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"batch_sizes": [0, 8]}, "batch_sizes values must be >= 1"),
        ({"batch_sizes": []}, "batch_sizes needs at least one value"),
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"repeats": 0}, "repeats must be >= 1"),
        ({"modes": ["fly"]}, r"modes\[0\] must be one of train, inference"),
        ({"dtypes": ["fp8"]}, r"dtypes\[0\] must be one of auto, fp32, bf16"),
        ({"routing_iters": [0]}, "routing_iters values must be >= 1"),
        ({"routing_batch_size": 0}, "routing_batch_size must be >= 1"),
        ({"compile": []}, "compile needs at least one value"),
        ({"channels_last": []}, "channels_last needs at least one value"),
        ({"compile_mode": "turbo"}, "compile_mode must be one of default, reduce-overhead"),
        ({"max_seconds": 0.0}, "max_seconds must be > 0"),
    ],
)
def test_bad_throughput_config_is_refused(values, match):
    with pytest.raises(CapsbenchError, match=match):
        from_dict(ThroughputConfig, values, where="throughput")


@pytest.mark.slow
def test_compile_mode_and_channels_last_are_settings_of_the_sweep(monkeypatch):
    seen = []

    def recording_compile(fn, **options):  # "compiles" to the function itself, recording the options
        seen.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    ctx = tiny_context()
    cfg = small_cfg(compile=[True], compile_mode="max-autotune", channels_last=[False, True], modes=["train"],
                    routing_iters=[1])  # fmt: skip
    df = run_throughput(ctx, cfg).tables["throughput"]
    assert len(df) == 2 * 2 * 2  # models x batch sizes x channels_last
    assert df["compile"].all() and (df.compile_mode == "max-autotune").all() and (df.compile_s > 0).all()
    assert df.groupby(["model", "batch_size"]).channels_last.nunique().eq(2).all()
    assert seen and all(o == {"mode": "max-autotune"} for o in seen)
    for tm in ctx.models.values():  # the sweep converted copies, never the run's models
        assert all(p.is_contiguous() for p in tm.model.parameters())


def test_report_names_how_the_best_speed_was_measured():
    from capsbench.report.headline import Headline

    def _speed(df, model, mode):
        return Headline("x", "x", "throughput", {"mode": mode}, kind="speed").cell({"throughput": df}, model)

    base = {"model": "m", "mode": "train", "dtype": "bf16", "repeats": 20}
    df = pd.DataFrame([{**base, "batch_size": 128, "samples_per_sec": 10.0, "compile": False, "compile_mode": None,
                        "channels_last": False},
                       {**base, "batch_size": 512, "samples_per_sec": 99.0, "compile": True,
                        "compile_mode": "reduce-overhead", "channels_last": True}])  # fmt: skip
    assert _speed(df, "m", "train") == "99 (batch 512, bf16, compiled reduce-overhead, channels_last, median of 20)"
    old = df.drop(columns=["compile_mode", "channels_last"])  # a run from before these columns
    assert _speed(old, "m", "train") == "99 (batch 512, bf16, compiled, median of 20)"
    assert _speed(df.iloc[:1], "m", "train") == "10 (batch 128, bf16, median of 20)"
    assert _speed(df, "m", "inference") == "–"
