"""FedRCL (client=fedrcl): its loss terms on hand-checkable batches, the models' per-level features, the gradients the
client method adds, and runs with FedAvg and with a last-layer FIPA phase."""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from fipa.client_methods import (
    FedRCL,
    cosine_similarities,
    divergence_penalty,
    feature_alignment_loss,
    supervised_contrastive_loss,
)
from fipa.errors import ConfigError
from fipa.models import ResNet20GN, SmallCNN
from fipa.train import run

DT = torch.float64
R = 1 / math.sqrt(2)


def test_supervised_contrastive_loss_by_hand():
    # f0 = (1, 0), f1 = (0, 1) of class 0, f2 = (1, 1)/sqrt 2 of class 1: s01 = 0, s02 = s12 = 1/sqrt 2
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [R, R]], dtype=DT)
    labels = torch.tensor([0, 0, 1])
    s = cosine_similarities(f)
    torch.testing.assert_close(s, torch.tensor([[1, 0, R], [0, 1, R], [R, R, 1]], dtype=DT))
    # anchors 0 and 1: hardest positive 0 (each other), negatives {R} (one other-class sample; the second is absent):
    #   -log(e^0 / (e^0 + e^R)) = log(1 + e^R); anchor 2: positive itself (1), negatives {R, R}: log(1 + 2 e^(R-1))
    expected = (2 * math.log(1 + math.exp(R)) + math.log(1 + 2 * math.exp(R - 1))) / 3
    assert float(supervised_contrastive_loss(s, labels, 1.0, 2)) == pytest.approx(expected, rel=1e-12)
    # one negative only: anchor 2 keeps one of its two other-class samples, log(1 + e^(R-1))
    expected_one = (2 * math.log(1 + math.exp(R)) + math.log(1 + math.exp(R - 1))) / 3
    assert float(supervised_contrastive_loss(s, labels, 1.0, 1)) == pytest.approx(expected_one, rel=1e-12)
    # temperature 0.5 doubles every logit
    expected_half = (2 * math.log(1 + math.exp(2 * R)) + math.log(1 + 2 * math.exp(2 * (R - 1)))) / 3
    assert float(supervised_contrastive_loss(s, labels, 0.5, 2)) == pytest.approx(expected_half, rel=1e-12)


def test_divergence_penalty_pushes_only_collapsed_classes_apart():
    # class 0: f0 = (1, 0), f1 = (0.8, 0.6) with cos 0.8; class 1: f2 = (0, 1) alone
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=DT)
    labels = torch.tensor([0, 0, 1])
    s = cosine_similarities(f)
    # threshold 0.7: anchors 0 and 1 each have the other as a negative (0.8 >= 0.7): log(1 + e^(0.8 - 1));
    # anchor 2 has no same-class partner: exactly 0
    expected = 2 * math.log(1 + math.exp(-0.2)) / 3
    assert float(divergence_penalty(s, labels, 1.0, 0.7)) == pytest.approx(expected, rel=1e-12)
    assert float(divergence_penalty(s, labels, 1.0, 0.9)) == 0.0  # 0.8 < 0.9: nothing has collapsed


def test_the_penalty_takes_the_least_similar_same_class_partner():
    # class 0 has three members: f0's partners have cos 0.95 and 0.75; with one negative, 0.75 is taken
    f = torch.tensor([[1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)], [0.75, -math.sqrt(1 - 0.75**2)]], dtype=DT)
    s = cosine_similarities(f)
    labels = torch.zeros(3, dtype=torch.long)
    rows = [math.log(1 + math.exp(min(s[i, j] for j in range(3) if j != i) - 1)) for i in range(3)]
    kept = [r if min(s[i, j] for j in range(3) if j != i) >= 0.7 else 0.0 for i, r in enumerate(rows)]
    assert float(divergence_penalty(s, labels, 1.0, 0.7)) == pytest.approx(sum(kept) / 3, rel=1e-12)


def test_feature_alignment_by_hand():
    local = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=DT)
    global_ = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=DT)
    assert float(feature_alignment_loss(local, global_)) == pytest.approx((1 - R + 0.0) / 2, rel=1e-12)
    # feature maps are average-pooled first
    maps = local[:, :, None, None].expand(2, 2, 3, 3)
    assert float(feature_alignment_loss(maps, global_)) == pytest.approx((1 - R) / 2, rel=1e-12)


@pytest.mark.parametrize("model,x,levels", [
    (SmallCNN(generator=torch.Generator().manual_seed(0)), torch.randn(4, 1, 28, 28), [(16, 28), (32, 14), (32,)]),
    (ResNet20GN(generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, 32, 32),
     [(16, 32), (16, 32), (32, 16), (64, 8)]),
])  # fmt: skip
def test_models_expose_their_levels_and_the_same_logits(model, x, levels):
    logits, features = model.layer_features(x)
    assert torch.equal(logits, model(x))
    assert [tuple(f.shape[1:2]) + tuple(f.shape[3:]) for f in features] == levels
    assert all(float(f.detach().min()) < 0 for f in features)  # before the ReLU


def test_the_client_method_adds_the_representation_gradient_and_clips():
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, channels=(4, 4), hidden=6, generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    module = types.SimpleNamespace(model=model, last_batch=(x, y))
    method = FedRCL(temperature=0.5, align_weight=0.3, prox_weight=0.0, clip_norm=None)
    method.on_train_start(None, module)
    global_copy = SmallCNN(image_size=8, channels=(4, 4), hidden=6)
    global_copy.load_state_dict(model.state_dict())
    with torch.no_grad():  # the local model moves away from the global one, so the alignment term is not 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    method.on_after_backward(None, module)
    # the same total, differentiated directly
    reference = SmallCNN(image_size=8, channels=(4, 4), hidden=6)
    reference.load_state_dict(model.state_dict())
    logits, local = reference.layer_features(x)
    with torch.no_grad():
        _, global_ = global_copy.layer_features(x)
    total = F.cross_entropy(logits, y)
    terms = []
    for f, g in zip(local, global_):
        s = cosine_similarities(f)
        terms.append(supervised_contrastive_loss(s, y, 0.5, 2) + divergence_penalty(s, y, 0.5, 0.7, 1)
                     + 0.3 * feature_alignment_loss(f, g))  # fmt: skip
    total = total + torch.stack(terms).mean()
    total.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    clipped = FedRCL(clip_norm=1e-3, prox_weight=0.5)
    clipped.on_train_start(None, module)
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a known drift on the first tensor
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    FedRCL.on_before_optimizer_step(clipped, None, module, None)
    grads = [p.grad for p in model.parameters()]
    norm = float(torch.cat([g.reshape(-1) for g in grads]).norm())
    assert norm == pytest.approx(1e-3, rel=1e-5)  # the proximal gradient 2 x 0.5 x drift, clipped to 1e-3
    assert torch.all(grads[0] > 0) and all(torch.count_nonzero(g) == 0 for g in grads[1:])
    del anchor


def test_bad_settings_are_config_errors():
    for kwargs in ({"temperature": 0}, {"negatives": 0}, {"scl_weight": -1}, {"clip_norm": 0}):
        with pytest.raises(ConfigError):
            FedRCL(**kwargs)


DIGITS = [
    "experiment=fmnist_dirichlet", "task.dataset=digits", "model.image_size=8", "task.num_clients=6",
    "federation.clients_per_round=3", "federation.local_epochs=1", "partition.alpha=0.5", "torch_threads=1",
    "aggregator=fedavg", "client=fedrcl",
]  # fmt: skip


def test_fedrcl_runs_with_fedavg_and_server_momentum_and_then_a_last_layer_fipa_phase(tmp_path):
    warm = run(compose_config(*DIGITS, "server_optimizer=momentum", "federation.rounds=2"), tmp_path / "warm")
    assert warm["status"] == "completed" and 0 < warm["test_acc"] <= 1
    phased = run(compose_config(*DIGITS, "federation.rounds=4", "schedule.switch_round=2",
                                "schedule.after=fipa_lastlayer", "+schedule.after_settings.rank=2"), tmp_path / "fipa")  # fmt: skip
    assert phased["status"] == "completed" and phased["rounds_completed"] == 4


def test_a_model_without_levels_is_refused_with_a_clear_message(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="layer_features"):
        run(tiny_config("client=fedrcl"), tmp_path)
