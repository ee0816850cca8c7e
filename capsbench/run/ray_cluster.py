"""`--executor ray`: the run's training jobs, then its (seed, part) evaluations, as Ray tasks.

Ray does the scheduling, the retries and the data movement: MNIST goes to the cluster once as an
object; each training task trains one cache key on one GPU (or ``task_cpus`` CPUs) and returns
its cache entry's files as a second object, which the driver installs into its cache only when
its storage is not the worker's (a shared ``--data-dir`` needs no copy), and which evaluation
tasks install likewise where they run. A worker that dies is retried by Ray (``RETRIES``) and
resumes from the checkpoint its cache folder holds. Only the driver writes the run folder.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from capsbench.core.allocator import tune_cpu_allocator
from capsbench.core.errors import CapsbenchError
from capsbench.data import cache_dir
from capsbench.report.folder import figure_png
from capsbench.run.evaluate import SeedRun, context, for_seed, models_tables, needs_training, run_part, seed_parts
from capsbench.run.jobs import JobOutcome, TrainJob, cache_path
from capsbench.run.plan import Plan
from capsbench.suite import Resolved, RunRequest

RAY_MISSING = '--executor ray needs Ray, which is not installed: pip install -e ".[ray]" (or pip install "ray>=2.9")'
RETRIES = 3  # Ray's retries of a task whose worker or node died (not of one that raised an error)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise CapsbenchError(RAY_MISSING) from None
    return ray


def check_reachable(address: str | None) -> None:
    """A HOST:PORT address must accept a connection within 5 s (Ray itself would retry for minutes)."""
    if address in (None, "auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CapsbenchError(f"--ray-address must be auto, local, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise CapsbenchError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it there with "
                             "`ray start --head --port PORT`, or check --ray-address") from None  # fmt: skip


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` (None or "local": start a new local instance with this
    machine's cores and GPUs, never one that `ray start` or RAY_ADDRESS left running); returns
    whether this call started Ray (and so should shut it down)."""
    check_reachable(address)
    if ray.is_initialized():  # a caller (a test, a notebook) connected already
        return False
    try:
        ray.init(address="local" if address in (None, "local") else address, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=True)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CapsbenchError(f"cannot connect to the Ray cluster ({address or 'local'}): {first}; start one "
                             "with `ray start --head`, or leave out --ray-address for a local instance") from None
    return True


def failure_text(ray: Any, e: BaseException) -> str:
    """One line for a task that failed for good: the task's own error, or why its worker died."""
    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    err = cause if cause is not None else e
    first = (str(err).strip().splitlines() or [""])[0]
    return first if isinstance(err, CapsbenchError) else f"{type(err).__name__}: {first}"


def one_line(failed: list[str], rest: str = "") -> CapsbenchError:
    """The error a phase ends with: its first failed task, then what was kept and how many more failed."""
    return CapsbenchError(failed[0] + rest + (f" ({len(failed) - 1} more failed)" if len(failed) > 1 else ""))


class Board:
    """A Ray actor the tasks tell when they start, so the driver can show running vs queued."""

    def __init__(self) -> None:
        self.running: set[str] = set()

    def start(self, name: str) -> None:
        self.running.add(name)

    def snapshot(self) -> set[str]:
        return set(self.running)


def task_setup(board: Any, name: str, threads: int) -> None:
    """First thing in every task: tell the board, and use exactly the task's CPUs (numerics of a
    CPU run depend on the thread count, so a task's CPUs are a local run's threads)."""
    from capsbench.parts import load_parts

    board.start.remote(name)
    load_parts()  # a fresh worker has imported only what unpickling the task needed
    tune_cpu_allocator()
    torch.set_num_threads(threads)


WORKER_FIELDS = ("device", "device_name", "cuda", "torch", "torch_threads", "cpu_count", "platform")


def worker_environment(device: str, threads: int) -> dict[str, Any]:
    """A Ray task: env.json's device fields as a task sees them."""
    from capsbench.core.env import environment

    torch.set_num_threads(threads)
    env = environment(torch.device(device))
    return {k: env[k] for k in WORKER_FIELDS}


def install_weights(root: str, weights: dict[str, tuple[str, list[Any]]]) -> None:
    """Put every needed cache entry in this node's cache (a no-op on storage the trainer shared)."""
    from capsbench.train.cache import install_entry

    ray = import_ray()
    for folder, refs in weights.values():
        path = cache_dir(root) / folder
        if not (path / "model.pt").exists():
            install_entry(path, ray.get(refs[0]))


def train_task(job: TrainJob, device: str, root: str, data: Any, board: Any, threads: int) -> tuple[JobOutcome, dict]:
    """A Ray task: train one job (resuming from its checkpoint after a retry); returns its outcome
    and its cache entry's files."""
    from capsbench.train.cache import entry_files

    task_setup(board, job.key, threads)
    out = job.run(torch.device(device), root, data, progress=False)
    return out, entry_files(cache_path(root, job))


def eval_task(r: Resolved, req: RunRequest, part: str | None, data: Any, weights: dict, fresh: frozenset[str],
              board: Any, name: str, threads: int) -> Any:  # fmt: skip
    """A Ray task: one seed's models table (``part`` None: metadata, clean accuracy, training
    record) or one part's result, with its figures as PNG bytes."""
    task_setup(board, name, threads)
    install_weights(req.data_dir, weights)
    trained = needs_training(r.parts)  # r.parts: the seed's parts, as a local run decides it
    ctx = context(r, req, data, trained, fresh)
    if part is None:
        return {n: tm.meta for n, tm in ctx.models.items()}, *models_tables(r, ctx, True)
    figures: dict[str, bytes] = {}
    res = run_part(ctx, part, r.parts[part], lambda n, fig: figures.__setitem__(n, figure_png(fig)), "")
    return res, figures


class RayExecutor:
    name = "ray"
    main = True  # the driver writes the run folder

    def __init__(self, address: str | None, task_cpus: int | None) -> None:
        self.ray = ray = import_ray()
        self.address = address or "local"
        self.started = connect(ray, address)
        resources = ray.cluster_resources()
        self.gpus, self.cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
        self.task_cpus = task_cpus or max(1, min(node_cpus, torch.get_num_threads()))
        if self.task_cpus > node_cpus:
            self.close()
            raise CapsbenchError(f"--ray-task-cpus {self.task_cpus}: no node of the Ray cluster has that many CPUs "
                                 f"(the largest has {node_cpus})")  # fmt: skip
        self.board = ray.remote(num_cpus=0)(Board).remote()

    def device(self, name: str) -> torch.device:
        """The workers' device: a GPU when the cluster has GPUs (--device auto), else the CPU."""
        if name == "auto":
            return torch.device("cuda" if self.gpus else "cpu")
        if name.startswith("cuda") and not self.gpus:
            raise CapsbenchError("--device cuda was asked for but the Ray cluster has no GPUs; "
                                 "use --device cpu or auto")  # fmt: skip
        return torch.device("cuda" if name.startswith("cuda") else name)

    def check(self, r: Resolved) -> None:
        """Nothing to check before the work: the cluster was reached, its device chosen."""

    def resources(self, device: torch.device) -> dict[str, Any]:
        return {"num_gpus": 1, "num_cpus": 1} if device.type == "cuda" else {"num_cpus": self.task_cpus}

    def threads(self, device: torch.device) -> int:
        return int(self.resources(device)["num_cpus"])

    def describe(self, device: torch.device) -> str:
        per = "1 GPU" if device.type == "cuda" else f"{self.task_cpus} CPU{'s' if self.task_cpus > 1 else ''}"
        return (f"Ray cluster {self.address}: {len(self.ray.nodes())} node(s), {self.cpus} CPUs, {self.gpus} GPUs; "
                f"{per} per task, on {device.type}")  # fmt: skip

    def environment(self, device: torch.device) -> dict[str, Any]:
        """The cluster, and the device a task computes on (asked of a worker: the driver's may differ)."""
        probe = self.ray.remote(worker_environment).options(**self.resources(device))
        worker = self.ray.get(probe.remote(device.type, self.threads(device)))
        return {"executor": "ray", "ray_address": self.address, "ray_version": self.ray.__version__,
                "ray_nodes": len(self.ray.nodes()), "ray_cpus": self.cpus, "ray_gpus": self.gpus,
                "ray_task_cpus": self.task_cpus, **worker}  # fmt: skip

    # ---- the two phases ----

    def train(self, plan: Plan, data: Any) -> dict[str, JobOutcome]:
        """Every job as a task; the driver's cache holds every entry afterwards."""
        from capsbench.train.cache import install_entry

        jobs, r, req = list(plan.jobs), plan.suite, plan.request
        ray, root = self.ray, str(cache_dir(req.data_dir).resolve())
        self.data = ray.put(data)
        task = ray.remote(train_task).options(num_returns=2, max_retries=RETRIES, **self.resources(r.device))
        refs = {job.key: task.remote(job, r.device.type, root, self.data, self.board, self.threads(r.device))
                for job in jobs}  # fmt: skip
        labels = {refs[j.key][0]: j for j in jobs}
        outcomes, failed = self.wait_all(labels, "training", req.progress)
        self.weights = {j.key: (j.folder, [refs[j.key][1]]) for j in jobs}
        for ref in outcomes:  # the finished ones, also when another failed: a rerun finds them here
            job = labels[ref]
            if not (cache_path(root, job) / "model.pt").exists():  # the worker's storage is not ours
                install_entry(cache_path(root, job), ray.get(refs[job.key][1]))
        if failed:
            rest = f"; the {len(outcomes)} finished training job(s) are in the cache: rerun to resume" if outcomes else ""
            raise one_line(failed, rest)
        return {o.key: o for o in outcomes.values()}

    def evaluate(self, plan: Plan, data: Any, fresh: frozenset[str], sink: Any) -> list[SeedRun]:
        ray, r, req, seeds = self.ray, plan.suite, plan.request, list(plan.seeds)
        shown, req = req.progress, replace(req, data_dir=str(cache_dir(req.data_dir).resolve()), progress=False)
        task = ray.remote(eval_task).options(max_retries=RETRIES, **self.resources(r.device))
        units: dict[Any, tuple[int, str | None]] = {}  # task -> (seed, part or None: the models)
        for i, seed in enumerate(seeds):
            rs, parts = for_seed(r, seed), seed_parts(r, i)
            for part in ([None] if needs_training(parts) else []) + list(parts):
                name = f"{part or 'models'} (seed {seed})"
                ref = task.remote(replace(rs, parts=parts), req, part, self.data, self.weights, fresh, self.board,
                                  name, self.threads(r.device))  # fmt: skip
                units[ref] = (seed, part)
        labels = {ref: f"{part or 'models'} (seed {seed})" for ref, (seed, part) in units.items()}
        results, failed = self.wait_all(labels, "evaluation", shown)
        if failed:
            raise one_line(failed)
        return self.seed_runs(r, seeds, units, results, sink)

    def seed_runs(self, r: Resolved, seeds: list[int], units: dict, results: dict, sink: Any) -> list[SeedRun]:
        """Assemble each seed's SeedRun from its tasks' results, in the local run's order."""
        from capsbench.run.evaluate import untrained

        runs = {seed: SeedRun(seed, {}) for seed in seeds}
        for ref, (seed, part) in units.items():
            run, out = runs[seed], results[ref]
            if part is None:
                run.metas, run.clean, run.record = out
                continue
            res, figures = out
            for name, png in figures.items():
                sink.png(name + (f"_seed{seed}" if len(seeds) > 1 else ""), png)
            run.results[part] = res
        for seed, run in runs.items():
            if not run.metas:  # no part needs trained weights: the untrained models' metadata
                cpu = replace(for_seed(r, seed), device=torch.device("cpu"))  # the driver may have no GPU
                run.metas = {n: tm.meta for n, tm in untrained(cpu).items()}
        return list(runs.values())

    def wait_all(self, labels: dict[Any, Any], phase: str, progress: bool) -> tuple[dict[Any, Any], list[str]]:
        """Wait for every task (showing done / running / queued); returns the finished ones' results
        and a line for each that failed for good."""
        ray, pending, done, failed = self.ray, list(labels), {}, []
        name = {ref: (j.label if isinstance(j, TrainJob) else j) for ref, j in labels.items()}
        key = {ref: (j.key if isinstance(j, TrainJob) else j) for ref, j in labels.items()}
        bar = tqdm(total=len(pending), desc=f"ray {phase}", unit="task", file=sys.stderr, dynamic_ncols=True,
                   disable=not progress, mininterval=1.0)  # fmt: skip
        t0 = time.perf_counter()
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    done[ref] = out = ray.get(ref)
                    if isinstance(labels[ref], TrainJob):
                        bar.write(out.line(labels[ref]))
                except ray.exceptions.RayError as e:
                    failed.append(f"{phase} task {name[ref]} failed: {failure_text(ray, e)}")
                    bar.write(f"  {failed[-1]}")
                bar.update(1)
            running = self.ray.get(self.board.snapshot.remote()) & {key[p] for p in pending}
            bar.set_postfix_str(f"running {len(running)}, queued {len(pending) - len(running)}, "
                                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
        bar.close()
        return done, failed

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
