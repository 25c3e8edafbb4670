"""core.optim: momentum Stiefel Adam keeps matrices orthonormal and minimises over the
manifold; its AdamW groups are AdamW; the Stiefel/rest split names exactly SODA's factors."""

import pytest
import torch
import torch.nn as nn

import core
from core.errors import ConfigError
from core.methods.spectral import SODA
from core.optim import StiefelAdam, is_orthonormal, split_stiefel, stiefel_adam_for


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matrices: one thread avoids OpenMP threads spinning on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def orthogonality_error(x: torch.Tensor) -> float:
    """|| X^T X - I ||_F for a tall X (X X^T for a wide one)."""
    m = x if x.shape[0] >= x.shape[1] else x.T
    gram = m.T.double() @ m.double()
    return float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype)))


def random_rotation(n: int, seed: int) -> torch.Tensor:
    """A rotation in SO(n) (reachable from the identity), as expm of a random skew matrix."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.matrix_exp(a - a.T)


@pytest.mark.parametrize("shape", [(8, 8), (10, 10), (12, 5), (5, 12)])
def test_stays_orthonormal_after_many_steps_with_random_gradients(shape):
    n, m = shape
    eye = torch.eye(max(n, m))[:n, :m]
    q = nn.Parameter(eye.clone())
    optimizer = StiefelAdam([q], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        q.grad = torch.randn(shape, generator=gen)
        optimizer.step()
    assert orthogonality_error(q.detach()) < 1e-5
    assert (q.detach() - eye).abs().max() > 0.1  # it did move on the manifold


@pytest.mark.parametrize("shape", [(6, 6), (9, 4)])
def test_fits_a_target_on_the_manifold(shape):
    n, m = shape
    target = random_rotation(n, seed=1)[:, :m]
    q = nn.Parameter(torch.eye(n)[:, :m].clone())
    optimizer = StiefelAdam([q], lr=0.05)
    losses = []
    for _ in range(300):
        loss = (q - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]  # the optimum is reached on the manifold
    torch.testing.assert_close(q.detach(), target, atol=2e-2, rtol=0)
    assert orthogonality_error(q.detach()) < 1e-5


def test_a_start_off_the_manifold_is_projected_onto_it():
    q = nn.Parameter(torch.eye(4) + 0.3 * torch.randn(4, 4, generator=torch.Generator()))
    assert not is_orthonormal(q.detach())
    q.grad = torch.zeros(4, 4)
    StiefelAdam([q], lr=0.01).step()
    assert orthogonality_error(q.detach()) < 1e-5


def test_resuming_from_a_saved_state_continues_the_same_run():
    def run(seeds, state=None, start=None):
        q = nn.Parameter(torch.eye(6)[:, :4].clone() if start is None else start[0].clone())
        b = nn.Parameter(torch.zeros(3) if start is None else start[1].clone())
        opt = StiefelAdam([{"params": [q]}, {"params": [b], "stiefel": False}], lr=0.05)
        if state is not None:
            opt.load_state_dict(state)  # casts the float64 moments to float32
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            q.grad, b.grad = torch.randn(6, 4, generator=gen), torch.randn(3, generator=gen)
            opt.step()
        return (q.detach(), b.detach()), opt.state_dict()

    straight, _ = run(range(6))
    half, state = run(range(3))
    resumed, _ = run(range(3, 6), state=state, start=half)
    for got, want in zip(resumed, straight, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_non_stiefel_groups_are_exactly_adamw():
    gen = torch.Generator().manual_seed(3)
    ours = [nn.Parameter(torch.randn(5, 3, generator=gen)), nn.Parameter(torch.randn(4))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    groups = [{"params": [ours[0]], "weight_decay": 0.1}, {"params": [ours[1]]}]
    opt = StiefelAdam(groups, lr=0.02, betas=(0.8, 0.95), weight_decay=0.0, stiefel=False)
    ref_groups = [{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]]}]
    ref_opt = torch.optim.AdamW(ref_groups, lr=0.02, betas=(0.8, 0.95), weight_decay=0.0)
    for _ in range(5):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def soda_model(orthogonal: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 4))
    return core.inject(model, SODA(orthogonal=orthogonal, kron_factors=2, targets=["0", "2"]))


def test_split_names_exactly_sodas_factors():
    stiefel, rest = split_stiefel(soda_model("stiefel"))
    assert sorted(stiefel) == [
        "0.adapters.default.factors.0",
        "0.adapters.default.factors.1",
        "2.adapters.default.factors.0",
        "2.adapters.default.factors.1",
    ]
    assert sorted(rest) == ["0.adapters.default.shift", "2.adapters.default.shift"]
    assert split_stiefel(soda_model("cayley"))[0] == {}  # skew parameters need no manifold


def test_soda_trains_with_stiefel_adam_and_keeps_its_factors_orthogonal():
    torch.manual_seed(0)
    model = soda_model("stiefel")
    x, target = torch.randn(16, 12), torch.randn(16, 4)
    optimizer = stiefel_adam_for(model, lr=0.02, weight_decay=0.01)
    assert [g["stiefel"] for g in optimizer.param_groups] == [False, True]
    losses = []
    for _ in range(40):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    for name, factor in split_stiefel(model)[0].items():
        assert orthogonality_error(factor.detach()) < 1e-5, name
        assert (factor.detach() - torch.eye(factor.shape[0])).abs().max() > 1e-3, name


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: StiefelAdam([p], lr=-1.0), "lr must be >= 0"),
        (lambda p: StiefelAdam([p], metric=1.0), "metric"),
        (lambda p: StiefelAdam([nn.Parameter(torch.zeros(3))]), "must be a matrix"),
    ],
)
def test_bad_settings_are_refused_with_clear_messages(make, message):
    with pytest.raises(ConfigError, match=message):
        make(nn.Parameter(torch.eye(3)))
