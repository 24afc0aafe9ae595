"""Client methods by value on hand examples: MOON's model-contrastive term (fipa.client_methods.Moon), driven
through its Lightning hooks with minimal fakes, against a loss written out by hand."""

import math

import pytest
import torch
from torch import nn

from fipa.client_methods import Moon

DT = torch.float64


class TinyMoonNet(nn.Module):
    """features(x) = W x (a 2 x 2 Linear without bias), then a head MOON never looks at."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 2, bias=False)
        self.head = nn.Linear(2, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class FakeModule(nn.Module):
    """What Moon's hooks read from the LightningModule: `.model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model


W_GLOBAL = [[1.0, 0.0], [0.0, 1.0]]  # z_glob(e_1) = e_1, z_glob(e_2) = e_2
W_PREVIOUS = [[0.0, 1.0], [1.0, 0.0]]  # z_prev(e_1) = e_2, z_prev(e_2) = e_1
W_LOCAL = [[3.0, 5.0], [4.0, 12.0]]  # z(e_1) = (3, 4), |z| = 5; z(e_2) = (5, 12), |z| = 13
X = torch.eye(2, dtype=DT)  # the batch: x_1 = e_1, x_2 = e_2
T = 0.5


def contrastive_loss_by_hand(W: torch.Tensor) -> torch.Tensor:
    """mean_i -log(e^{s1_i/T} / (e^{s1_i/T} + e^{s2_i/T})), s1 = cos(z_i, z_glob,i), s2 = cos(z_i, z_prev,i), with
    z_i = W x_i = column i of W and the frozen representations written out as the literals above."""
    z = W.T  # row i = W e_i
    z_glob = torch.tensor(W_GLOBAL, dtype=DT).T
    z_prev = torch.tensor(W_PREVIOUS, dtype=DT).T

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    s1, s2 = cos(z, z_glob), cos(z, z_prev)
    return (-torch.log(torch.exp(s1 / T) / (torch.exp(s1 / T) + torch.exp(s2 / T)))).mean()


def moon_gradient(mu: float, previous: list[list[float]] | None):
    """Runs Moon's hooks as Lightning would for one client and one batch; returns (the gradient Moon adds to
    every parameter, the main gradient that was already there, Moon, the model)."""
    torch.manual_seed(0)
    model = TinyMoonNet().to(DT)
    with torch.no_grad():
        model.body.weight.copy_(torch.tensor(W_GLOBAL, dtype=DT))  # the broadcast point
    module = FakeModule(model)
    client_state = None
    if previous is not None:  # the client's previous local model, flat, as the server side ships it
        prev = TinyMoonNet().to(DT)
        with torch.no_grad():
            prev.body.weight.copy_(torch.tensor(previous, dtype=DT))
        client_state = nn.utils.parameters_to_vector(prev.parameters()).detach()
    moon = Moon(mu=mu, temperature=T)
    moon.begin_client(3, None, client_state)
    moon.on_train_start(None, module)
    with torch.no_grad():  # local training has moved the representation since the broadcast
        model.body.weight.copy_(torch.tensor(W_LOCAL, dtype=DT))
    moon.on_train_batch_start(None, module, (X, torch.tensor([0, 1])), 0)
    main = {name: torch.full_like(p, 0.25) for name, p in model.named_parameters()}  # "the main backward"
    for name, p in model.named_parameters():
        p.grad = main[name].clone()
    moon.on_after_backward(None, module)
    added = {name: p.grad - main[name] for name, p in model.named_parameters()}
    return added, moon, model


def test_hand_loss_has_the_hand_computed_value():
    # sample 1: cos(z, z_glob) = 3/5, cos(z, z_prev) = 4/5  -> l_1 = log(1 + e^{(0.8 - 0.6)/T}) = log(1 + e^0.4)
    # sample 2: cos(z, z_glob) = 12/13, cos(z, z_prev) = 5/13 -> l_2 = log(1 + e^{(5/13 - 12/13)/T}) = log(1 + e^{-14/13})
    # mean: (0.9130152523999526 + 0.2931486366440598) / 2
    value = contrastive_loss_by_hand(torch.tensor(W_LOCAL, dtype=DT))
    assert value.item() == pytest.approx(0.6030819445220063, rel=1e-14)
    assert value.item() == pytest.approx((math.log(1 + math.exp(0.4)) + math.log(1 + math.exp(-14 / 13))) / 2, rel=1e-14)


@pytest.mark.parametrize("mu", [1.0, 2.5])
def test_moon_adds_the_gradient_of_mu_times_the_hand_computed_contrastive_loss(mu):
    added, moon, model = moon_gradient(mu, W_PREVIOUS)
    W = torch.tensor(W_LOCAL, dtype=DT, requires_grad=True)
    (expected,) = torch.autograd.grad(mu * contrastive_loss_by_hand(W), W)
    assert expected.abs().min() > 1e-3  # every entry of the hand gradient is far from zero: a real check
    torch.testing.assert_close(added["body.weight"], expected, rtol=1e-12, atol=1e-14)
    # the head is not part of the representation: MOON adds nothing there, and the main gradient is kept
    assert torch.equal(added["head.weight"], torch.zeros_like(added["head.weight"]))
    assert torch.equal(added["head.bias"], torch.zeros_like(added["head.bias"]))
    # after local training the worker hands back its local model, the next round's "previous"
    moon.on_train_end(None, FakeModule(model))
    torch.testing.assert_close(moon.end_client(), nn.utils.parameters_to_vector(model.parameters()).detach())


def test_moon_term_is_constant_without_a_previous_model_and_off_at_mu_zero():
    # First round of a client: previous = global, so s1 = s2 for every sample, l = log 2 whatever W: no gradient
    # (with the previous model of the test above, the same W gets a gradient with no entry below 1e-3).
    added, _, _ = moon_gradient(1.0, None)
    torch.testing.assert_close(added["body.weight"], torch.zeros(2, 2, dtype=DT), rtol=0, atol=1e-15)
    # and with a previous model but mu = 0 nothing is added either
    added, _, _ = moon_gradient(0.0, W_PREVIOUS)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in added.values())
