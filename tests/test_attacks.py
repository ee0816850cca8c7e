"""Every registered attack: eps=0 is clean, the L-inf box holds, modes are restored, attacks hurt a
trained model (PGD more than FGSM), examples do not depend on their batch. Shared fixtures for the
attack and adversarial-part tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capsbench.attacks import ATTACKS, PGD, Attack
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, build_model, count_correct
from capsbench.models.cnn import CNNClassifier
from tests.conftest import synthetic_digits

NAMES = tuple(ATTACKS.names())  # every registered attack; the properties below hold for each
TINY_CAPS = dict(conv_channels=16, primary_types=4)


def tiny_cnn(seed: int = 0) -> CNNClassifier:
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2))  # (B, 8, 6, 6)
    head = nn.Sequential(nn.Linear(8 * 36, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
    return CNNClassifier(features, head, 28, 10)


def train(model: BenchModel, x_u8: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 3e-3) -> BenchModel:
    """A few dozen Adam steps on the synthetic digits; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        xb = x_u8[idx].float().unsqueeze(1) / 255
        loss = model.objective(model(xb, y[idx]), xb, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def inputs(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().unsqueeze(1) / 255  # (B, 1, 28, 28) in [0, 1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread than on cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def faint(x_u8: torch.Tensor) -> torch.Tensor:
    """The synthetic digits at 40% brightness, so that eps ~ 0.1-0.2 can erase or fake a block."""
    return (x_u8.float() * 0.4).round().to(torch.uint8)


@pytest.fixture(scope="module")
def data():
    tx, ty = synthetic_digits(2048, 0)
    vx, vy = synthetic_digits(128, 1)
    return faint(tx), ty, inputs(faint(vx)), vy


@pytest.fixture(scope="module")
def full_range():
    vx, vy = synthetic_digits(32, 1)
    return inputs(vx), vy  # pixels at 0 and at 1


@pytest.fixture(scope="module")
def trained_cnn(data):
    tx, ty, x, y = data
    model = train(tiny_cnn(), tx, ty, steps=80)
    assert count_correct(model, x, y).item() / len(y) > 0.9  # the premise of the tests below
    return model


@pytest.fixture(scope="module")
def trained_caps_dec(data):
    tx, ty, _, _ = data
    torch.manual_seed(0)
    return train(build_model("capsnet", **TINY_CAPS), tx, ty, steps=25, lr=1e-2)


@pytest.fixture(scope="module")
def trained_caps(data):
    tx, ty, _, _ = data
    torch.manual_seed(0)
    return train(build_model("capsnet", **TINY_CAPS, reconstruction=False), tx, ty, steps=25, lr=1e-2)


# Small budgets so every registered attack runs in a fraction of a second on the tiny models.
BUDGETS = {"apgd": {"steps": 5}, "apgd-t": {"steps": 3, "targets": 2}, "square": {"queries": 20},
           "reconstructive": {"steps": 3}, "vote": {"steps": 3}}  # fmt: skip


def make(name: str, model: BenchModel, eps: float, **kw) -> Attack:
    return ATTACKS.get(name)(model, eps, **{**BUDGETS.get(name, {}), **kw})


def run(atk: Attack, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Call ``atk`` with true labels, and target classes when it is targeted."""
    return atk(x, y, gen, target=(y + 3) % 10 if atk.targeted else None)


def model_for(name: str, cnn: BenchModel, caps_dec: BenchModel) -> BenchModel:
    """The tiny trained CNN, or the tiny CapsNet with a decoder for attacks that need capsules
    (the reconstructive attack its decoder, the vote attack its votes)."""
    return caps_dec if name in ("reconstructive", "vote") else cnn


def test_registry_has_the_attacks():
    assert {"fgsm", "fgsm-targeted", "pgd", "noise", "apgd", "apgd-t", "square", "reconstructive"} <= set(NAMES)
    with pytest.raises(CapsbenchError, match="known attacks"):
        ATTACKS.get("cw")


@pytest.mark.parametrize("name", NAMES)
def test_eps_zero_returns_input_and_clean_accuracy(name, trained_cnn, trained_caps_dec, data):
    _, _, x, y = data
    model = model_for(name, trained_cnn, trained_caps_dec)
    adv = run(make(name, model, 0.0), x, y)
    assert torch.equal(adv, x)
    assert count_correct(model, adv, y).item() == count_correct(model, x, y).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_output_in_unit_box_and_eps_ball(name, eps, trained_cnn, trained_caps_dec, full_range):
    x, y = full_range
    assert x.min() == 0 and x.max() == 1  # pixels at both bounds: the clamp matters
    adv = run(make(name, model_for(name, trained_cnn, trained_caps_dec), eps), x, y, torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6
    assert (adv - x).abs().max() >= eps - 1e-6  # it moved by eps somewhere


def test_pgd_projects_large_steps_and_random_start(trained_cnn, full_range):
    x, y = full_range
    adv = PGD(trained_cnn, 0.1, steps=3, step_size=0.5, random_start=True)(x, y, torch.Generator().manual_seed(0))
    assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_mode_and_requires_grad_restored(name, data):
    _, _, x, y = data
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPS) if name in ("reconstructive", "vote") else tiny_cnn()
    model.train()
    next(model.parameters()).requires_grad_(False)  # a mixed state must come back as it was
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, any(p.requires_grad for p in m.parameters()))))
    adv = run(make(name, model, 0.1), x[:8], y[:8], torch.Generator().manual_seed(0))
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    if name != "noise":  # noise never runs the model
        assert seen and all(not training and not grads for training, grads in seen)
    assert adv.shape == x[:8].shape


def test_targeted_step_lowers_target_loss(trained_cnn, data):
    _, _, x, y = data
    target = (y + 1 + torch.randint(0, 9, y.shape, generator=torch.Generator().manual_seed(1))) % 10
    adv = make("fgsm-targeted", trained_cnn, 0.05)(x, y, target=target)
    with pytest.raises(ValueError, match="targeted: pass target classes"):
        make("fgsm-targeted", trained_cnn, 0.05)(x, y)
    with torch.no_grad():
        before = trained_cnn.attack_loss(trained_cnn(x), target).mean()
        after = trained_cnn.attack_loss(trained_cnn(adv), target).mean()
    assert after < before


def test_attacks_hurt_a_trained_model_and_pgd_beats_fgsm(trained_cnn, data):
    _, _, x, y = data
    eps = 0.15
    acc = {"clean": count_correct(trained_cnn, x, y).item()}
    for name in ("fgsm", "pgd", "noise"):
        acc[name] = count_correct(trained_cnn, make(name, trained_cnn, eps)(x, y, torch.Generator().manual_seed(0)), y).item()
    assert acc["fgsm"] <= acc["clean"] and acc["pgd"] <= acc["fgsm"]
    assert acc["pgd"] < acc["clean"] - 0.2 * len(y), acc  # the attack really does something
    assert acc["noise"] >= acc["fgsm"], acc


@pytest.mark.parametrize("kind", ["cnn", "capsnet"])
@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_example_result_does_not_depend_on_its_batch(kind, name, trained_cnn, trained_caps, data):
    _, _, x, y = data
    model = trained_cnn if kind == "cnn" else trained_caps
    kw = {"steps": 3} if name == "pgd" else {}
    batch = make(name, model, 0.1, **kw)(x[:16], y[:16])
    for i in (0, 7):
        alone = make(name, model, 0.1, **kw)(x[i : i + 1], y[i : i + 1])
        # Identical up to sign flips of float-noise-sized gradient entries (none expected).
        assert (alone[0] != batch[i]).float().mean() < 0.005


def test_autocast_dtype_keeps_fp32_inputs_and_the_box(trained_cnn, data):
    _, _, x, y = data
    adv = make("pgd", trained_cnn, 0.1, dtype=torch.bfloat16, steps=2)(x[:16], y[:16])
    assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x[:16]).abs().max() <= 0.1 + 1e-6


def test_batch_size_option_gives_the_same_result(trained_caps, data):
    _, _, x, y = data
    whole = make("fgsm", trained_caps, 0.1)(x[:12], y[:12])
    split = make("fgsm", trained_caps, 0.1, batch_size=5)(x[:12], y[:12])
    assert (whole != split).float().mean() < 0.005


def test_zero_gradient_diagnostic_counts_masked_images(data):
    _, _, x, y = data
    model = tiny_cnn()
    with torch.no_grad():
        model.features[0].weight.zero_()  # the output no longer depends on the input
    atk = make("fgsm", model, 0.1)
    adv = atk(x[:10], y[:10])
    assert atk.zero_grads.item() == 10 and torch.equal(adv, x[:10])
    atk = make("fgsm", tiny_cnn(), 0.1)
    atk(x[:10], y[:10])
    assert atk.zero_grads.item() == 0


@pytest.mark.parametrize("name", ["fgsm", "fgsm-targeted"])
def test_single_step_direction_reuse_gives_the_images_of_a_fresh_call(name, trained_caps, data):
    """The adversarial part computes a single-step attack's direction once per eps sweep; every eps
    must still get bit-identical images to a fresh attack at that eps, with the same masking count."""
    _, _, x, y = data
    target = (y + 3) % 10 if name == "fgsm-targeted" else None
    d = make(name, trained_caps, 0.1).direction(x, y, target)
    assert set(d.unique().tolist()) <= {-1.0, 0.0, 1.0}
    for eps in (0.0, 0.05, 0.3):
        fresh = make(name, trained_caps, eps)
        expected = fresh(x, y, target=target)
        assert torch.equal(make(name, trained_caps, eps).from_direction(x, d), expected)
