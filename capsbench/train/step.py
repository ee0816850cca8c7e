"""One training step and one inference forward, shared by the Trainer (every training loop: MNIST
classification, MultiMNIST, time to accuracy) and the throughput part, so the speed that is
measured is the speed that trains. The step's loss is a hook (``LossFn``; default: the model's own
``objective``), so a task with its own loss (MultiMNIST) gets the same speed options.

The speed options, each off by default (the plain eager step is the reference), each computing
the same function (tests/test_step.py):

- ``compile``: torch.compile of the forward and the loss as one graph, so the loss's elementwise
  work fuses with the model's last kernels; ``compile_mode`` picks inductor's mode.
  ``reduce-overhead`` and ``max-autotune`` replay the step as CUDA graphs on a GPU (one launch
  for routing's many small kernels); the CPU ignores that part. A failed compile falls back to
  eager after one notice (``CompileOrEager``).
- ``channels_last``: convolution weights and inputs in NHWC, the layout cuDNN's bf16 tensor-core
  kernels read without a transpose.

No step reads a value back to the host: the loss and the number of correct predictions stay
device tensors until the caller logs them.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Literal, get_args

import torch
from torch import Tensor, nn

from capsbench.core.device import autocast
from capsbench.core.errors import CapsbenchError
from capsbench.data.multimnist import two_digit_error
from capsbench.models.base import BenchModel, ModelOutput, predict

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES = get_args(CompileMode)
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes in which inductor records CUDA graphs


class CompileOrEager:
    """``torch.compile(fn)`` that falls back to eager, with one notice, if compiling fails.

    torch.compile is lazy: a missing C compiler or an unsupported op shows up on the first call,
    not when compile() returns. The first failure switches this wrapper to eager for good.
    """

    def __init__(self, module: Callable, **options: Any) -> None:
        self.module, self.failure = module, ""
        try:
            self.compiled: Callable | None = torch.compile(module, **options)
        except Exception as e:  # noqa: BLE001 - compile is optional
            self._fallback(e)

    def _fallback(self, e: BaseException) -> None:
        self.compiled = None
        first = (str(e).strip().splitlines() or [""])[0][:160]
        self.failure = f"{type(e).__name__}: {first}"
        print(f"notice: torch.compile unavailable here ({self.failure}); running eagerly", file=sys.stderr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except (CapsbenchError, torch.cuda.OutOfMemoryError):
                raise  # not a compile failure: eager would fail the same way
            except Exception as e:  # noqa: BLE001 - a real bug fails again, eagerly, below
                self._fallback(e)
        return self.module(*args, **kwargs)


def check_compile_mode(mode: str, where: str) -> None:
    if mode not in COMPILE_MODES:
        raise CapsbenchError(f"{where} must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def compile_options(mode: str, backend: str | None = None) -> dict[str, Any]:
    """Keyword arguments of torch.compile for ``mode``; ``backend`` (tests: "aot_eager") replaces
    inductor, which then ignores the mode."""
    if backend is not None:
        return {"backend": backend}
    return {} if mode == "default" else {"mode": mode}


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in NHWC, in place (the Parameter objects stay, so an optimizer made
    before keeps them); other 4-D parameters such as CapsNet's W are left alone."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return model


class StepOptions:
    """What a step runs under: device, autocast dtype, compile, compile mode, channels_last."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None, compile: bool = False,
                 compile_mode: str = "default", channels_last: bool = False, backend: str | None = None) -> None:  # fmt: skip
        check_compile_mode(compile_mode, "compile_mode")
        self.device, self.dtype, self.compile = device, dtype, compile
        self.compile_mode, self.channels_last, self.backend = compile_mode, channels_last, backend
        self.cudagraphs = compile and backend is None and device.type == "cuda" and compile_mode in CUDAGRAPH_MODES

    def inputs(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` compiled when asked. Each compiled step starts from a reset dynamo: all steps
        share one code object, and past dynamo's per-function recompile limit (8: models,
        options, dtypes) a new one would silently run eagerly. Steps are built one at a time."""
        if not self.compile:
            return fn
        torch._dynamo.reset()
        return CompileOrEager(fn, **compile_options(self.compile_mode, self.backend))

    def begin(self) -> None:
        """Tell CUDA-graph trees a new step starts: the last step's outputs may now be reused."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()


class _Step:
    """A step's wrapped function ``fn``: the plain one, or a CompileOrEager around it."""

    def __init__(self, model: BenchModel, options: StepOptions, fn: Callable) -> None:
        self.model, self.options = model, options
        if options.channels_last:
            to_channels_last(model)
        self.fn = options.wrap(fn)

    @property
    def compiled(self) -> bool:
        """Compiled as asked, not fallen back to eager."""
        return isinstance(self.fn, CompileOrEager) and self.fn.compiled is not None

    @property
    def failure(self) -> str:
        """Why compiling failed ("" if it did not, or was not asked for)."""
        return self.fn.failure if isinstance(self.fn, CompileOrEager) else ""


LossFn = Callable[[BenchModel, tuple[Tensor, ...]], tuple[Tensor, ModelOutput]]  # (model, batch) -> (loss, out)


def objective(model: BenchModel, batch: tuple[Tensor, ...]) -> tuple[Tensor, ModelOutput]:
    """The model's own training loss on a classification batch (x (B, 1, S, S), y (B,)), and the outputs."""
    x, y = batch
    out = model(x, y)
    return model.objective(out, x, y), out


def hits(out: ModelOutput, y: Tensor) -> Tensor:
    """Examples with every label predicted, a 0-dim device tensor: argmax == y for labels (B,);
    the two highest scores exactly the two labels for labels (B, 2) (MultiMNIST)."""
    if y.dim() == 1:
        return (predict(out) == y).sum()
    return (~two_digit_error(out.scores, y)).sum()


class TrainStep(_Step):
    """Forward and loss (one graph when compiled), backward, optimizer step; returns the loss and
    the number of correct predictions as device tensors (no host sync)."""

    def __init__(self, model: BenchModel, opt: torch.optim.Optimizer, options: StepOptions,
                 loss: LossFn | None = None) -> None:  # fmt: skip
        self.loss = loss or objective
        super().__init__(model, options, self.forward_loss)
        self.opt = opt

    def forward_loss(self, x: Tensor, y: Tensor, *extra: Tensor) -> tuple[Tensor, ModelOutput]:
        return self.loss(self.model, (x, y, *extra))

    def __call__(self, x: Tensor, y: Tensor, *extra: Tensor) -> tuple[Tensor, Tensor]:
        """One step on the batch (inputs x, labels y, then whatever else the loss reads)."""
        o = self.options
        o.begin()
        x = o.inputs(x)
        with autocast(o.device, o.dtype):
            loss, out = self.fn(x, y, *extra)
            correct = hits(out, y)  # from the outputs before backward and the next step reuse them
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach(), correct


class InferStep(_Step):
    """An eval-mode forward without gradients (compiled when asked); returns the scores."""

    def __init__(self, model: BenchModel, options: StepOptions) -> None:
        super().__init__(model, options, self.scores)

    def scores(self, x: Tensor) -> Tensor:
        return self.model(x).scores

    def __call__(self, x: Tensor) -> Tensor:
        o = self.options
        o.begin()
        with torch.no_grad(), autocast(o.device, o.dtype):
            return self.fn(o.inputs(x))
