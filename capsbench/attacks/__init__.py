"""White-box and score-based L-inf attacks: one base (``base.Attack``), the losses they climb as
data (``losses.LOSSES``), one short file per attack, each registered in ``ATTACKS`` by name, and
AutoAttack's standard composition (``autoattack``)."""

from capsbench.attacks.apgd import APGD, TargetedAPGD
from capsbench.attacks.autoattack import STANDARD, AutoAttack, Budget
from capsbench.attacks.base import ATTACKS, Attack, SingleStep, attack_mode, model_device, project
from capsbench.attacks.fgsm import FGSM, TargetedFGSM
from capsbench.attacks.losses import LOSSES, AttackLoss, resolve_loss
from capsbench.attacks.noise import SignNoise
from capsbench.attacks.pgd import PGD
from capsbench.attacks.reconstructive import ReconstructiveAttack
from capsbench.attacks.square import Square
from capsbench.attacks.vote import VoteAttack

__all__ = ["APGD", "ATTACKS", "Attack", "AttackLoss", "AutoAttack", "Budget", "FGSM", "LOSSES", "PGD",
           "ReconstructiveAttack", "STANDARD", "SignNoise", "SingleStep", "Square", "TargetedAPGD", "TargetedFGSM", "VoteAttack",
           "attack_mode", "model_device", "project", "resolve_loss"]  # fmt: skip
