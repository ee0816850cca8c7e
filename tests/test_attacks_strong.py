"""The attack losses, APGD/APGD-T, Square, AutoAttack and the reconstructive attack: properties
that hold for any model, checked on the tiny trained models of tests/test_attacks.py."""

from __future__ import annotations

import pytest
import torch

from capsbench.attacks import APGD, FGSM, LOSSES, PGD, AutoAttack, Budget, ReconstructiveAttack, Square, TargetedAPGD
from capsbench.attacks.apgd import checkpoint_lengths
from capsbench.attacks.losses import resolve_loss
from capsbench.attacks.square import square_fraction
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, ModelOutput, build_model, count_correct
from capsbench.models.scoring import reconstruction_error
from tests.test_attacks import TINY_CAPS, data, one_thread, train, trained_cnn  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def caps(data):  # noqa: F811
    tx, ty, _, _ = data
    torch.manual_seed(0)
    return train(build_model("capsnet", **TINY_CAPS), tx, ty, steps=25, lr=1e-2)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Scores(torch.nn.Module):
    """A stand-in model whose attack scores are given: for the loss formulas alone."""

    score_kind = "logits"
    num_classes = 10

    def attack_scores(self, out: ModelOutput) -> torch.Tensor:
        return out.scores


# ---- losses --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["margin", "ce", "dlr", "cw"])
@pytest.mark.parametrize("targeted", [False, True])
def test_every_loss_is_per_example(loss, targeted, caps, data):  # noqa: F811
    """Changing example 1's input leaves example 0's objective and gradient unchanged."""
    _, _, x, y = data
    x = x[:4].clone().requires_grad_(True)
    fn = LOSSES.get(loss)
    t = (y[:4] + 1) % 10 if targeted else None
    obj = fn(caps.eval(), caps(x), y[:4], t)
    (g,) = torch.autograd.grad(obj.sum(), x)
    x2 = x.detach().clone()
    x2[1] = torch.rand_like(x2[1])
    x2.requires_grad_(True)
    obj2 = fn(caps, caps(x2), y[:4], t)
    (g2,) = torch.autograd.grad(obj2.sum(), x2)
    assert obj.shape == (4,) and torch.allclose(obj[0], obj2[0], atol=1e-6) and torch.allclose(g[0], g2[0], atol=1e-6)


def test_dlr_is_invariant_to_shift_and_positive_scale():
    z = torch.randn(16, 10)
    y, t = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    dlr = LOSSES.get("dlr")
    for target in (None, t):
        base = dlr(Scores(), ModelOutput(z), y, target)
        assert torch.allclose(dlr(Scores(), ModelOutput(3.7 * z + 5.0), y, target), base, atol=1e-5)
        assert not torch.allclose(dlr(Scores(), ModelOutput(-z), y, target), base)  # not invariant to a flip


def test_cw_is_positive_exactly_when_misclassified_and_targeted_forms_rise_with_the_target():
    z = torch.randn(64, 10)
    y = torch.randint(0, 10, (64,))
    cw = LOSSES.get("cw")(Scores(), ModelOutput(z), y)
    assert torch.equal(cw > 0, z.argmax(1) != y)
    t = (y + 1) % 10
    up = z.clone()
    up[torch.arange(64), t] += 0.3
    for name in ("ce", "cw", "dlr"):
        f = LOSSES.get(name)
        rises = f(Scores(), ModelOutput(up), y, t) >= f(Scores(), ModelOutput(z), y, t) - 1e-6
        if name == "dlr":  # its denominator moves with z_t once the target is the top class
            rises = rises | (up.argmax(1) == t)
        assert rises.all(), name


def test_losses_a_model_cannot_provide_are_refused_by_name(trained_cnn):  # noqa: F811
    with pytest.raises(ValueError, match="loss 'margin' needs capsule lengths; CNNClassifier outputs logits"):
        resolve_loss("margin", trained_cnn)
    with pytest.raises(ValueError, match="loss 'margin' needs capsule lengths"):
        FGSM(trained_cnn, 0.1, loss="margin")
    with pytest.raises(CapsbenchError, match="unknown attack loss 'hinge'; known attack losses: ce, cw, dlr, margin"):
        PGD(trained_cnn, 0.1, loss="hinge")
    assert resolve_loss("own", trained_cnn).name == "ce"


def test_capsnet_attack_scores_keep_the_prediction_and_stay_finite(caps, data):  # noqa: F811
    _, _, x, _ = data
    with torch.no_grad():
        out = caps(x[:32])
    z = caps.attack_scores(out)
    assert torch.equal(z.argmax(1), out.scores.argmax(1)) and torch.isfinite(z).all()
    edge = caps.attack_scores(ModelOutput(torch.tensor([[0.0, 1.0, 0.5] + [0.2] * 7])))
    assert torch.isfinite(edge).all() and edge[0, 2].abs() < 1e-6  # length 1/2 -> log-odds 0


# ---- APGD ----------------------------------------------------------------------------------


def test_apgd_schedule_and_bad_budgets(trained_cnn):  # noqa: F811
    assert checkpoint_lengths(100) == (22, 3, 6) and checkpoint_lengths(5) == (1, 1, 1)
    for kw in ({"steps": 0}, {"restarts": 0}):
        with pytest.raises(ValueError, match="APGD needs steps >= 1 and restarts >= 1"):
            APGD(trained_cnn, 0.1, **kw)
    for targets in (0, 10):
        with pytest.raises(ValueError, match="APGD-T needs 1 <= targets < 10"):
            TargetedAPGD(trained_cnn, 0.1, targets=targets)
    with pytest.raises(ValueError, match="Square needs queries >= 1"):
        Square(trained_cnn, 0.1, queries=0)


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_apgd_beats_fgsm_and_pgd_and_stays_in_the_box(eps, trained_cnn, data):  # noqa: F811
    _, _, x, y = data
    adv = APGD(trained_cnn, eps, loss="ce", steps=20)(x, y, gen())
    assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().max() <= eps + 1e-6
    acc = {name: int(count_correct(trained_cnn, a, y)) for name, a in
           (("apgd", adv), ("fgsm", FGSM(trained_cnn, eps, loss="ce")(x, y)), ("pgd", PGD(trained_cnn, eps, loss="ce", steps=10)(x, y)))}  # fmt: skip
    assert acc["apgd"] <= acc["fgsm"] and acc["apgd"] <= acc["pgd"] + 2, acc


def test_apgd_restarts_never_lose_what_the_first_run_found(trained_cnn, data):  # noqa: F811
    """Restarts keep every first run's success (each later run only adds images)."""
    _, _, x, y = data
    one = APGD(trained_cnn, 0.1, steps=8)(x, y, gen(3))
    three = APGD(trained_cnn, 0.1, steps=8, restarts=3)(x, y, gen(3))
    wrong_one = trained_cnn(one).scores.argmax(1) != y
    wrong_three = trained_cnn(three).scores.argmax(1) != y
    assert (wrong_three | ~wrong_one).all() and wrong_three.sum() >= wrong_one.sum()


def test_apgd_t_never_beats_clean_and_finds_something(trained_cnn, data):  # noqa: F811
    _, _, x, y = data
    adv = TargetedAPGD(trained_cnn, 0.15, steps=10, targets=3)(x, y, gen())
    assert (adv - x).abs().max() <= 0.15 + 1e-6
    assert int(count_correct(trained_cnn, adv, y)) < int(count_correct(trained_cnn, x, y))


# ---- Square --------------------------------------------------------------------------------


def test_square_schedule_halves_at_the_reference_points():
    assert square_fraction(0, 10000, 0.8) == 0.8 and square_fraction(11, 10000, 0.8) == 0.4
    assert square_fraction(51, 10000, 0.8) == 0.2 and square_fraction(9999, 10000, 0.8) == pytest.approx(0.8 / 512)
    assert square_fraction(6, 1000, 0.8) == pytest.approx(0.2)  # rescaled: query 6 of 1,000 is 60 of 10,000


def test_square_needs_no_gradient_keeps_vertices_and_fooled_images(trained_cnn, data):  # noqa: F811
    _, _, x, y = data
    seen = []
    hook = trained_cnn.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled() and a[0].requires_grad))
    try:
        adv = Square(trained_cnn, 0.3, queries=150)(x, y, gen())
    finally:
        hook.remove()
    assert seen and not any(seen)  # scores only: no graph, no input gradient
    d = (adv - x).abs()
    at_vertex = ((d - 0.3).abs() < 1e-6) | (adv == 0) | (adv == 1)
    assert at_vertex.all() and d.max() <= 0.3 + 1e-6
    assert int(count_correct(trained_cnn, adv, y)) < int(count_correct(trained_cnn, x, y))


def test_square_returns_each_images_first_misclassified_candidate(trained_cnn, data):  # noqa: F811
    """Under cw a misclassified candidate always lowers the loss of a correct image, so it is
    accepted, and a fooled image never changes again: the image returned is the first candidate
    that fooled the model (or, never fooled, one that did not)."""
    _, _, x, y = data
    calls = []
    hook = trained_cnn.register_forward_hook(lambda m, a, out: calls.append((a[0].detach(), out.scores.argmax(1))))
    try:
        adv = Square(trained_cnn, 0.1, queries=60)(x, y, gen())
    finally:
        hook.remove()
    queries = calls[:-1]  # the last forward is keep_misclassified's look at the clean images
    wrong = torch.stack([pred != y for _, pred in queries])  # (queries, B)
    ever = wrong.any(0)
    assert 0 < int(ever.sum()) < len(y)  # an informative eps: some fooled, some not
    first = wrong.float().argmax(0)
    for i in ever.nonzero().squeeze(1).tolist():
        assert torch.equal(adv[i], queries[int(first[i])][0][i])
    assert (trained_cnn(adv).scores.argmax(1)[~ever] == y[~ever]).all()


@pytest.mark.parametrize("name", ["apgd", "square"])
def test_a_wrong_image_is_never_made_right(name):
    """A model with a zero input gradient and a wrong prediction at x: searching attacks must
    return x for it (the reference attacks only correct images), not a lucky iterate."""

    class Step(BenchModel):
        input_size, num_classes, score_kind = 28, 2, "logits"

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, y=None):
            m = x.flatten(1).mean(1, keepdim=True)
            c = ((m > 0.5).float() * 2 - 1) + 0 * m + 0 * self.w  # depends on x with a zero gradient
            return ModelOutput(torch.cat([c, torch.zeros_like(c)], 1))

    x = torch.full((64, 1, 28, 28), 0.5 - 1e-4)
    y = torch.zeros(64, dtype=torch.long)  # class 0 needs mean > 0.5: wrong at x
    atk = APGD(Step(), 0.1, steps=10) if name == "apgd" else Square(Step(), 0.1, queries=50)
    adv = atk(x, y, gen())
    assert torch.equal(adv, x)


# ---- AutoAttack ----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_autoattack_stages_only_ever_remove_robust_images(eps, trained_cnn, data):  # noqa: F811
    _, _, x, y = data
    out = AutoAttack(trained_cnn, eps, Budget(steps=5, targets=2, queries=20))(x, y, gen())
    prev = out.clean
    for stage in ("apgd-ce", "apgd-t", "square"):
        now = out.robust_after[stage]
        assert not (now & ~prev).any()  # robust after a stage => robust before it
        prev = now
    fooled = out.clean & ~prev
    assert (trained_cnn(out.adv[fooled]).scores.argmax(1) != y[fooled]).all()
    assert (out.adv - x).abs().max() <= eps + 1e-6
    if eps == 0:
        assert torch.equal(prev, out.clean)


def test_autoattack_reports_every_gradient_and_query_to_its_progress_callback(trained_cnn, data):  # noqa: F811
    _, _, x, y = data
    with torch.no_grad():
        right = trained_cnn(x).scores.argmax(1) == y
    x, y = x[right][:12], y[right][:12]  # every image starts robust, and 1e-4 leaves them so
    seen: list[str] = []
    attack = AutoAttack(trained_cnn, 1e-4, Budget(steps=4, targets=2, queries=6), batch_size=8, on_step=seen.append)
    out = attack(x, y, gen())
    assert out.robust_after["square"].all()
    batches = 2  # 12 images in batches of 8: one call per batch and gradient (steps + 1 per run) or query
    assert seen == ["apgd-ce"] * 5 * batches + ["apgd-t"] * 2 * 5 * batches + ["square"] * 7 * batches


# ---- the reconstructive attack -------------------------------------------------------------


def test_reconstructive_attack_needs_a_decoder(trained_cnn):  # noqa: F811
    with pytest.raises(ValueError, match="needs a model with a reconstruction; CNNClassifier has none"):
        ReconstructiveAttack(trained_cnn, 0.1)


def test_reconstructive_attack_without_threshold_is_pgd_on_ce(caps, data):  # noqa: F811
    """With no threshold the penalty vanishes: the same steps as PGD on ce, so every image PGD
    fools it fools too (it keeps the last successful iterate instead of the final one)."""
    _, _, x, y = data
    rec = ReconstructiveAttack(caps, 0.15, steps=4)(x[:32], y[:32])
    pgd = PGD(caps, 0.15, loss="ce", steps=4)(x[:32], y[:32])
    rec_wrong = caps(rec).scores.argmax(1) != y[:32]
    pgd_wrong = caps(pgd).scores.argmax(1) != y[:32]
    assert (rec_wrong | ~pgd_wrong).all()


def test_reconstructive_attack_keeps_an_undetected_success_once_found(caps, data):  # noqa: F811
    """With weight 0 its steps are PGD's on ce; wherever PGD's final image fools the model under
    the threshold, the image it returns must be an undetected success too."""
    _, _, x, y = data
    x, y = x[:32], y[:32]
    with torch.no_grad():
        threshold = float(reconstruction_error(caps(x), x).quantile(0.9))

    def undetected(imgs):
        with torch.no_grad():
            out = caps(imgs)
            return (out.scores.argmax(1) != y) & (reconstruction_error(out, imgs) <= threshold)

    pgd = PGD(caps, 0.2, loss="ce", steps=6)(x, y)
    rec = ReconstructiveAttack(caps, 0.2, steps=6, threshold=threshold, weight=0.0)(x, y)
    assert (undetected(rec) | ~undetected(pgd)).all() and undetected(rec).sum() >= undetected(pgd).sum()
    weighted = ReconstructiveAttack(caps, 0.2, steps=6, threshold=threshold, weight=10.0)(x, y)
    assert (weighted - x).abs().max() <= 0.2 + 1e-6
