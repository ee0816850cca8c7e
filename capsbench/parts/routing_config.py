"""The routing part's configuration and its sizes per preset."""

from __future__ import annotations

from dataclasses import dataclass

from capsbench.attacks import STANDARD, Budget
from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError


@dataclass(frozen=True)
class RoutingConfig:
    n: int = opt(1000, ge=1)  # test images for clean and noise accuracy
    composite_n: int = opt(1000, ge=1)  # digits of the affNIST-style composite (affine part's ranges)
    copies: int = opt(4, ge=1)  # random affine copies per composite digit
    attack_n: int = opt(1000, ge=1)  # images for AutoAttack, the vote attack, the worst case and the statistics
    eps: float = opt(0.1, gt=0, le=1)  # L-inf budget of the attacks
    noise_eps: float = opt(0.3, gt=0, le=1)  # size of the random sign noise
    aa_stages: list[str] = opt(factory=lambda: list(STANDARD), nonempty=True)
    apgd_steps: int = opt(100, ge=1)
    apgd_targets: int = opt(9, ge=1, le=9)
    square_queries: int = opt(5000, ge=1)
    vote_steps: int = opt(100, ge=1)
    batch_size: int = opt(250, ge=1)

    def validate(self, where: str) -> None:
        for s in self.aa_stages:
            if s not in ("apgd-ce", "apgd-dlr", "apgd-t", "square"):
                raise CapsbenchError(f"unknown attack {s!r} in {where}.aa_stages; known: apgd-ce, apgd-dlr, apgd-t, square")

    @property
    def budget(self) -> Budget:
        return Budget(self.apgd_steps, self.apgd_targets, 1, self.square_queries)


SIZING = {
    "smoke": dict(n=64, composite_n=32, copies=1, attack_n=32, apgd_steps=3, apgd_targets=2, square_queries=10,
                  vote_steps=3, batch_size=64),
    "quick": dict(n=500, composite_n=250, copies=2, attack_n=100, apgd_steps=20, apgd_targets=3, square_queries=200,
                  vote_steps=20, batch_size=100),
    "standard": dict(n=1000, composite_n=500, copies=4, attack_n=500, apgd_steps=25, apgd_targets=3,
                     square_queries=300, vote_steps=20),
    "full": dict(),
}  # fmt: skip
