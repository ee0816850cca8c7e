"""A run's plan: everything `run` will do, resolved once before any work and never changed after.

The suite file, its preset, the parts' sizes and the request's overrides resolve into one
checked configuration (``suite.resolve``); the claims to evaluate narrow its parts (pure: a new
configuration, not an edit); the seeds and the training jobs (one per cache key) complete it.
The executors train ``plan.jobs`` and evaluate ``plan.suite`` for ``plan.seeds``; the runner
writes the folder from the same plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from capsbench.core.errors import CapsbenchError
from capsbench.run.jobs import TrainJob, training_jobs
from capsbench.suite import Resolved, RunRequest, resolve


@dataclass(frozen=True)
class Plan:
    suite: Resolved  # the checked configuration, its parts narrowed to the evaluated claims
    request: RunRequest
    seeds: tuple[int, ...]
    claims: tuple[Any, ...] | None  # the claims evaluated (None: the run evaluates none)
    jobs: tuple[TrainJob, ...]  # every model to train or find in the cache, once per cache key

    @property
    def device(self) -> Any:
        return self.suite.device


def resolve_run(raw: dict[str, Any], name: str, req: RunRequest, device: Any) -> tuple[Resolved, tuple[Any, ...] | None]:
    """The checked configuration (parts narrowed to the claims) and the claims, from the suite file
    ``raw``, the request and the executor's ``device``: every refusal of bad input happens here,
    before any data is loaded."""
    claims, r = select_claims(resolve(raw, name, req, device=device), req.claims)
    return r, claims


def make_plan(r: Resolved, claims: tuple[Any, ...] | None, req: RunRequest, data: Any) -> Plan:
    """The run's plan: ``resolve_run``'s configuration and claims, the seeds, the training jobs."""
    seeds = run_seeds(r, req)
    return Plan(r, req, seeds, claims, tuple(training_jobs(r, req, list(seeds), data)))


def run_seeds(r: Resolved, req: RunRequest) -> tuple[int, ...]:
    """--seeds, or the suite's seed."""
    return tuple(req.seeds) or (r.train.seed,)


CLAIM_SUITES = ("paper", "routing", "viewpoints")  # the suites that evaluate their parts' claims unasked


def select_claims(r: Resolved, ids: tuple[str, ...]) -> tuple[tuple[Any, ...] | None, Resolved]:
    """The claims a run evaluates and the configuration that measures them: --claims, or for a
    suite of CLAIM_SUITES every claim of its parts that its preset does not leave out
    (``skip_claims``), else none (and r).

    --claims, and a preset that leaves claims out, narrow the run to the parts (and Table 1
    variants) the evaluated claims need; claims asked for by name run whatever the preset leaves out."""
    from capsbench.report.claims import select

    if not ids and r.name not in CLAIM_SUITES:
        if r.skip_claims:
            raise CapsbenchError(f"skip_claims: suite {r.name} evaluates no claims (only {' and '.join(CLAIM_SUITES)} "
                                 "do, or a run with --claims), so there is nothing to leave out; remove the table")  # fmt: skip
        return None, r
    claims = [c for c in select(",".join(ids)) if ids or (c.id not in r.skip_claims and c.part in r.parts)]
    if ids or r.skip_claims:
        r = dataclasses.replace(r, parts=needed_parts(r, claims))
    return tuple(claims), (dataclasses.replace(r, skip_claims={}) if ids else r)


def needed_parts(r: Resolved, claims: list[Any]) -> dict[str, Any]:
    """r's parts that ``claims`` need, Table 1 narrowed to their variants."""
    needed = {c.part for c in claims}
    missing = sorted(needed - set(r.parts))
    if missing:
        raise CapsbenchError(f"claim(s) need part {missing[0]!r}, which suite {r.name} does not run; "
                             "use `run paper --claims ...`")  # fmt: skip
    parts = {p: c for p, c in r.parts.items() if p in needed}
    if "table1" in parts:
        wanted = [c.id for c in claims if c.part == "table1"]
        parts["table1"] = dataclasses.replace(parts["table1"], claims=wanted)
    return parts
