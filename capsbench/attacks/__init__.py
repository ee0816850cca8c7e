"""White-box L-inf attacks: one base (``base.Attack``) and one short file per attack, each
registered in ``ATTACKS`` by name."""

from capsbench.attacks.base import ATTACKS, Attack, SingleStep, attack_mode, model_device
from capsbench.attacks.fgsm import FGSM, TargetedFGSM
from capsbench.attacks.noise import SignNoise
from capsbench.attacks.pgd import PGD

__all__ = ["ATTACKS", "Attack", "FGSM", "PGD", "SignNoise", "SingleStep", "TargetedFGSM", "attack_mode", "model_device"]
