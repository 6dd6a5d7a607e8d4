"""Weighting methods: property checks on hand-built statistics, limits, hand computations, oracles, checkpoints."""

from __future__ import annotations

import dataclasses
import io
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchjd.aggregation import MGDA, PCGrad, UPGrad
from torchjd.scalarization import UW, GeometricMean

import sgs_lab
from sgs_lab.weighting import GRAMIAN, METHODS, SCALARIZERS, available_methods, make_method

pytestmark = pytest.mark.usefixtures("one_thread")
AVAILABLE = available_methods()


# -------------------------------------------------------------------------------------------------------------------
# statistics with the GradStats fields, built from explicit per-sample gradients g (T, B, P)
@dataclasses.dataclass
class FakeStats:
    tasks: tuple
    cosine: torch.Tensor
    dot: torch.Tensor
    norm: torch.Tensor
    ref_norm: torch.Tensor
    task_cosine: torch.Tensor
    gramian: torch.Tensor
    conflict: torch.Tensor
    mask: torch.Tensor
    losses: torch.Tensor

    def total(self, values):  # one process holds the whole batch, as GradStats without a process group
        return values.sum(-1)

    def batch_max(self, values):
        return values.amax(-1)


def _cos(dot, a, b):
    denom = a * b
    return torch.where(denom > 0, dot / denom.where(denom > 0, torch.ones_like(denom)), torch.zeros_like(dot))


def fake_stats(g=None, *, mask=None, losses=None, seed=0, shape=(2, 8, 5), dtype=torch.float64) -> FakeStats:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(*shape, generator=gen, dtype=dtype) if g is None else g.to(dtype)
    n_tasks, batch, _ = g.shape
    mask = torch.ones(n_tasks, batch, dtype=torch.bool) if mask is None else mask
    if losses is None:
        losses = torch.rand(n_tasks, batch, generator=gen, dtype=dtype) + 0.1
    gm = g * mask[..., None]
    mean = gm.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (T, P)
    dot = (g * mean[:, None]).sum(-1)  # (T, B)
    norm, ref_norm = g.norm(dim=-1), mean.norm(dim=-1)[:, None].expand(n_tasks, batch)
    gramian = mean @ mean.T
    diag = gramian.diagonal().sqrt()
    cross = torch.einsum("sbp,tbp->bst", g, g)  # (B, T, T)
    sq = cross.diagonal(dim1=1, dim2=2).sqrt()  # (B, T)
    nan = torch.tensor(float("nan"), dtype=dtype)
    both = mask.T[:, :, None] & mask.T[:, None, :]
    return FakeStats(
        tasks=tuple(f"t{i}" for i in range(n_tasks)),
        cosine=torch.where(mask, _cos(dot, norm, ref_norm), nan),
        dot=torch.where(mask, dot, nan),
        norm=torch.where(mask, norm, nan),
        ref_norm=torch.where(mask, ref_norm, nan),
        task_cosine=_cos(gramian, diag[:, None], diag[None, :]),
        gramian=gramian,
        conflict=torch.where(both, _cos(cross, sq[:, :, None], sq[:, None, :]), nan),
        mask=mask,
        losses=torch.where(mask, losses.to(dtype), nan),
    )


def permute_samples(stats, perm):
    cols = {k: getattr(stats, k)[:, perm] for k in ("cosine", "dot", "norm", "ref_norm", "mask", "losses")}
    return dataclasses.replace(stats, conflict=stats.conflict[perm], **cols)


def permute_tasks(stats, perm):
    rows = {k: getattr(stats, k)[perm] for k in ("cosine", "dot", "norm", "ref_norm", "mask", "losses")}
    square = {k: getattr(stats, k)[perm][:, perm] for k in ("task_cosine", "gramian")}
    tasks = tuple(stats.tasks[i] for i in perm)
    return dataclasses.replace(stats, tasks=tasks, conflict=stats.conflict[:, perm][:, :, perm], **rows, **square)


# -------------------------------------------------------------------------------------------------------------------
# reusable property checks
def run(method, sequence, epoch=5):
    """Drive ``method`` like the trainer over a list of statistics; the weights of the last step."""
    for stats in sequence:
        torch.manual_seed(0)  # randomised methods draw the same numbers in both runs of a comparison
        out = method.weights(stats, epoch=epoch)
        method.after_step(stats, torch.nan_to_num(stats.losses).mean(1) * 0.9)
    return out


def assert_valid(out, stats):
    w, lam = out
    n_tasks, batch = stats.mask.shape
    for value, shape in ((w, (n_tasks, batch)), (lam, (n_tasks,))):
        if value is not None:
            assert value.shape == shape and value.dtype == stats.cosine.dtype and not value.requires_grad
            assert torch.isfinite(value).all()


def assert_sample_weights_mean_one(w, mask):
    assert (w[mask] >= 0).all()
    for t in range(mask.shape[0]):
        if mask[t].any():
            torch.testing.assert_close(w[t][mask[t]].mean().item(), 1.0)


def assert_task_weights_mean_one(lam):
    assert (lam >= 0).all()
    torch.testing.assert_close(lam.mean().item(), 1.0)


def assert_close_or_none(a, b, perm=None, dim=0, atol=1e-6):
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(
            b, a if perm is None else a.index_select(dim, torch.as_tensor(perm)), atol=atol, rtol=1e-4
        )


def assert_permutation_equivariant(name, knobs, sequence, *, over):
    perm = [2, 0, 1] if over == "tasks" else [3, 1, 7, 0, 6, 5, 2, 4]
    permute = permute_tasks if over == "tasks" else permute_samples
    w1, lam1 = run(make_method(name, **knobs), sequence)
    w2, lam2 = run(make_method(name, **knobs), [permute(s, perm) for s in sequence])
    if over == "tasks":
        assert_close_or_none(w1, w2, perm), assert_close_or_none(lam1, lam2, perm)
    else:
        assert_close_or_none(w1, w2, perm, dim=1), assert_close_or_none(lam1, lam2)


# -------------------------------------------------------------------------------------------------------------------
# every method
SGS_VARIANTS = {
    "sgs": {"warmup": 0},
    "sgs-softmax": {"warmup": 0, "sample_rule": "softmax", "temperature": 0.3, "clamp": (0.5, 1.5)},
    "sgs-affine-dot": {"warmup": 0, "sample_rule": "affine", "alpha": 2.0, "similarity": "dot"},
    "sgs-coherence": {"warmup": 0, "task_rule": "coherence"},
}
CASES = {**{m: (m, {}) for m in AVAILABLE if m != "sgs"}, **{k: ("sgs", v) for k, v in SGS_VARIANTS.items()}}
MEAN_ONE = {"ew", "gradnorm", *SGS_VARIANTS}  # methods promising task weights of mean 1
MAY_BE_NEGATIVE = {"imtlg", "alignedmtl"}  # closed forms whose task weights can be negative
RANDOM_ORDER = {"pcgrad", "gradvac", "rlw"}  # draw random task orders/weights: not task-permutation equivariant
MASK = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)


def sequence(n_tasks=3):
    return [fake_stats(shape=(n_tasks, 8, 5), seed=s, mask=MASK[:n_tasks]) for s in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_structure(case, dtype):
    name, knobs = CASES[case]
    stats_seq = [fake_stats(shape=(3, 8, 5), seed=s, mask=MASK, dtype=dtype) for s in range(3)]
    w, lam = out = run(make_method(name, **knobs), stats_seq)
    assert_valid(out, stats_seq[-1])
    if w is not None:
        assert_sample_weights_mean_one(w, MASK)
    if case in MEAN_ONE and lam is not None:
        assert_task_weights_mean_one(lam)
    if lam is not None and case not in MAY_BE_NEGATIVE:
        assert (lam >= 0).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_permutation_equivariant(case):
    assert_permutation_equivariant(*CASES[case], sequence(), over="samples")


@pytest.mark.parametrize("case", sorted(set(CASES) - RANDOM_ORDER))
def test_task_permutation_equivariant(case):
    assert_permutation_equivariant(*CASES[case], sequence(), over="tasks")


def test_repr_and_errors():
    assert repr(make_method("ew")) == "EW(scope='all')"
    assert repr(make_method("sgs", reference="ema", clamp=(0, 3))) == (
        "SGS(reference='ema', scope='output', similarity='cosine', sample_rule='affine', temperature=1.0, alpha=1.0, "
        "clamp=(0.0, 3.0), task_rule='consistency', task_temperature=0.5, warmup=5, ema_decay=0.9)"
    )
    assert repr(make_method("gradnorm", alpha=1.0)) == "GradNorm(alpha=1.0, lr=0.025, scope='all')"
    assert repr(make_method("fairgrad", alpha=2.0)) == "TorchJDWeighting('fairgrad', scope='all', alpha=2.0)"
    assert repr(make_method("uw", lr=0.01)) == "TorchJDScalarizer('uw', scope='all', lr=0.01)"
    assert repr(make_method("dwa", temperature=1.0)) == "TorchJDScalarizer('dwa', scope='all', temperature=1.0)"
    for name in AVAILABLE:
        method = make_method(name)
        assert method.name == name and repr(method).startswith(type(method).__name__ + "(")
    with pytest.raises(ValueError, match="valid methods: .*'ew'.*'sgs'"):
        make_method("nope")
    for name, knobs in (("sgs", {"tempreature": 1}), ("upgrad", {"tempreature": 1}), ("uw", {"tempreature": 1})):
        with pytest.raises(TypeError, match="tempreature"):
            make_method(name, **knobs)
    with pytest.raises(ValueError, match="sample_rule"):
        make_method("sgs", sample_rule="max")
    assert set(AVAILABLE) <= set(METHODS) and "cagrad" in METHODS and set(GRAMIAN) | set(SCALARIZERS) < set(METHODS)


@pytest.mark.skipif(find_spec("cvxpy") is not None, reason="cvxpy installed")
def test_cagrad_without_its_extra_says_how_to_install():
    assert "cagrad" not in AVAILABLE
    with pytest.raises(ImportError, match=r'pip install "torchjd\[cagrad\]"'):
        make_method("cagrad")


# -------------------------------------------------------------------------------------------------------------------
# SGS: limits, rules, masks
def test_sgs_limits_reduce_to_equal_weighting():
    stats = fake_stats(shape=(3, 8, 5), mask=MASK)
    uniform, ones = MASK.double(), torch.ones(3, dtype=torch.float64)
    w, lam = make_method("sgs", warmup=3).weights(stats, epoch=2)
    assert torch.equal(w, uniform) and torch.equal(lam, ones)
    w, _ = make_method("sgs", warmup=0, sample_rule="softmax", temperature=1e9).weights(stats, epoch=0)
    torch.testing.assert_close(w, uniform)
    w, _ = make_method("sgs", warmup=0, sample_rule="affine", alpha=0.0).weights(stats, epoch=0)
    torch.testing.assert_close(w, uniform)
    _, lam = make_method("sgs", warmup=0, task_temperature=1e9).weights(stats, epoch=0)
    torch.testing.assert_close(lam, ones)
    _, lam = make_method("sgs", warmup=0, task_rule="none").weights(stats, epoch=0)
    assert torch.equal(lam, ones)


def test_sgs_relu_rule_and_hand_computed_task_weights():
    stats = fake_stats(shape=(2, 4, 3))
    cosine = torch.tensor([[0.5, -0.2, 0.3, 0.0], [-0.1, -0.4, 0.0, -0.3]], dtype=torch.float64)
    stats = dataclasses.replace(stats, cosine=cosine)
    w, lam = make_method("sgs", warmup=0, sample_rule="relu").weights(stats, epoch=0)
    torch.testing.assert_close(w[0], torch.tensor([2.5, 0.0, 1.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.ones(4, dtype=torch.float64))  # every cosine <= 0: uniform
    torch.testing.assert_close(lam, 2 * torch.softmax(torch.tensor([0.15, -0.2], dtype=torch.float64) / 0.5, 0))
    _, lam = make_method("sgs", warmup=0, task_rule="coherence").weights(stats, epoch=0)
    rho = stats.gramian.diagonal() / (stats.norm**2).mean(1)
    torch.testing.assert_close(lam, 2 * rho / rho.sum())
    assert (rho <= 1 + 1e-12).all()
    w, _ = make_method("sgs", warmup=0, sample_rule="affine", alpha=2.0, clamp=(0.0, 1.5)).weights(stats, epoch=0)
    raw = torch.tensor([2.0, 0.6, 1.6, 1.0], dtype=torch.float64)  # max(0, 1 + 2s)
    clamped = (4 * raw / raw.sum()).clamp(max=1.5)  # mean 1, clamped, then mean 1 again
    torch.testing.assert_close(w[0], 4 * clamped / clamped.sum())
    # the last sample of task 0 unlabelled: every formula runs over the 3 labelled samples
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    masked = dataclasses.replace(fake_stats(shape=(2, 4, 3), mask=mask), cosine=cosine.masked_fill(~mask, torch.nan))
    w, lam = make_method("sgs", warmup=0, sample_rule="relu").weights(masked, epoch=0)
    torch.testing.assert_close(w[0], torch.tensor([1.875, 0.0, 1.125, 0.0], dtype=torch.float64))
    torch.testing.assert_close(lam, 2 * torch.softmax(torch.tensor([0.2, -0.2], dtype=torch.float64) / 0.5, 0))
    _, lam = make_method("sgs", warmup=0, task_rule="coherence").weights(masked, epoch=0)
    rho = masked.gramian.diagonal() / (masked.norm**2).nanmean(1)
    torch.testing.assert_close(lam, 2 * rho / rho.sum())


@pytest.mark.parametrize("knobs", list(SGS_VARIANTS.values()))
def test_sgs_ignores_masked_entries(knobs):
    stats = fake_stats(shape=(3, 8, 5), mask=MASK)
    w, lam = make_method("sgs", **knobs).weights(stats, epoch=0)
    junk = {k: torch.where(MASK, getattr(stats, k), torch.full_like(stats.cosine, v))
            for k, v in (("cosine", 0.9), ("dot", 1e6), ("norm", float("inf")), ("losses", -3.0))}  # fmt: skip
    w2, lam2 = make_method("sgs", **knobs).weights(dataclasses.replace(stats, **junk), epoch=0)
    torch.testing.assert_close(w2[MASK], w[MASK])
    torch.testing.assert_close(lam2, lam)
    assert_sample_weights_mean_one(w, MASK)
    assert torch.isfinite(w).all() and torch.isfinite(w2).all()


def test_sgs_ema_reference_is_owned():
    method = make_method("sgs", reference="ema", ema_decay=0.8)
    assert isinstance(method.reference, sgs_lab.EMAReference) and method.reference.decay == 0.8
    assert make_method("sgs", reference="loo").reference == "loo"


# -------------------------------------------------------------------------------------------------------------------
# torchjd adapters and GradNorm
def gramian_stats(G):
    """Statistics whose tasks' mean gradients are the rows of G (T, P)."""
    return fake_stats(G[:, None, :].expand(-1, 4, -1).clone())


@pytest.mark.parametrize("name", sorted(set(GRAMIAN) & set(AVAILABLE)))
def test_gramian_orthogonal_equal_norms(name):
    _, lam = make_method(name).weights(gramian_stats(2 * torch.eye(2, 3)), epoch=0)
    torch.testing.assert_close(lam[0], lam[1])
    if name != "fairgrad":  # no conflict: equal weighting (the convention of sgs_lab.weighting._torchjd)
        torch.testing.assert_close(lam, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "pcgrad"])
def test_gramian_non_conflicting(name):
    G = torch.tensor([[1.0, 0.2, 0.0], [-0.9, 0.5, 0.1], [0.1, -1.0, 2.0]], dtype=torch.float64)
    G = G[:2] if name == "pcgrad" else G  # PCGrad is non-conflicting for two tasks
    _, lam = make_method(name).weights(gramian_stats(G), epoch=0)
    tolerance = 2e-4 * (G**2).sum()  # torchjd's projector regularises the trace-normalised Gramian by 1e-4
    assert ((lam @ G) @ G.T >= -tolerance).all()


def test_gradnorm_moves_toward_the_slowest_task():
    method, G = make_method("gradnorm"), torch.eye(2, 3)
    assert torch.equal(run(method, [fake_stats(G[:, None].expand(-1, 4, -1), losses=torch.ones(2, 4))])[1],
                       torch.ones(2, dtype=torch.float64))  # fmt: skip
    stats = fake_stats(G[:, None].expand(-1, 4, -1), losses=torch.tensor([[0.5], [0.9]]).expand(2, 4))
    _, lam = method.weights(stats, epoch=0)
    assert torch.equal(lam, torch.ones(2, dtype=torch.float64))  # the weights used at a step are pre-update
    _, lam = method.weights(stats, epoch=0)  # r = (5/7, 9/7): task 1 lags, its target norm is larger
    torch.testing.assert_close(lam, torch.tensor([0.975, 1.025], dtype=torch.float64))


def test_uw_weights_and_learning():
    method = make_method("uw", lr=0.01)
    stats = fake_stats(shape=(2, 4, 3), losses=torch.tensor([[2.0], [0.5]]).expand(2, 4))
    _, lam = method.weights(stats, epoch=0)
    torch.testing.assert_close(lam, torch.full((2,), 0.5, dtype=torch.float64))  # ∂/∂L of ½e^{-s}L + ½s at s = 0
    log_var = method.scalarizer.log_var.detach().clone()  # one Adam step against d/ds = ½ - ½e^{-s}L
    torch.testing.assert_close(log_var, torch.tensor([0.01, -0.01], dtype=torch.float64))
    _, lam = method.weights(stats, epoch=0)
    torch.testing.assert_close(lam, 0.5 * torch.exp(-log_var))


@pytest.mark.parametrize("name", sorted({"gradnorm", "uw", "imtll", "famo", "dwa", "gradvac"} & set(AVAILABLE)))
def test_state_dict_round_trip(name):
    stats_seq = [fake_stats(shape=(3, 8, 5), seed=s, mask=MASK) for s in range(8)]

    def steps(method, seq, start):
        outs = []
        for k, stats in enumerate(seq, start):
            torch.manual_seed(k)
            outs.append(method.weights(stats, epoch=k // 2)[1])
            method.after_step(stats, torch.nan_to_num(stats.losses).mean(1) * 0.9)
            if k % 2 == 1:
                method.end_epoch(k // 2)
        return outs

    first = make_method(name)
    steps(first, stats_seq[:5], 0)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    expected = steps(first, stats_seq[5:], 5)
    second = make_method(name)
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    got = steps(second, stats_seq[5:], 5)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert not all(torch.equal(expected[0], e) for e in expected[1:]) or name == "gradvac"


# -------------------------------------------------------------------------------------------------------------------
# real statistics: the weights drive stats.backward, and reproduce torchjd's aggregations and scalarizations
def _real(reference="batch", seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh()).double()
    heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 1)]).double()
    x, y, target = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)), torch.randn(10).double()
    masks = {"a": torch.ones(10, dtype=torch.bool), "b": torch.arange(10) % 3 != 0}

    def step(ref=reference):
        probe = sgs_lab.SampleGradients(encoder)
        with probe.capture():
            z = encoder(x)
        losses = {"a": F.cross_entropy(heads[0](z), y, reduction="none"), "b": (heads[1](z)[:, 0] - target) ** 2}
        return probe.compute(losses, labels={"a": y, "b": y}, reference=ref, masks=masks)

    return encoder, step


def _encoder_grad(encoder):
    return torch.cat([p.grad.flatten() for p in encoder.parameters()])


@pytest.mark.parametrize("name", AVAILABLE)
def test_real_statistics_drive_backward(name):
    encoder, step = _real()
    stats = step()
    w, lam = make_method(name, **({"warmup": 0} if name == "sgs" else {})).weights(stats, epoch=0)
    encoder.zero_grad()
    stats.backward(w, lam)
    assert torch.isfinite(_encoder_grad(encoder)).all()


@pytest.mark.parametrize(
    ("name", "aggregator", "factor"), [("upgrad", UPGrad(), 2), ("mgda", MGDA(), 2), ("pcgrad", PCGrad(), 1)]
)
def test_gramian_weights_reproduce_the_aggregator(name, aggregator, factor):
    encoder, step = _real()
    stats = step()
    jacobian = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        loss[stats.mask[t]].mean(), list(encoder.parameters()), retain_graph=True)])
        for t, loss in enumerate(stats._attached_losses)])  # fmt: skip
    _, lam = make_method(name).weights(stats, epoch=0)
    encoder.zero_grad()
    stats.backward(None, lam, heads=False)
    torch.testing.assert_close(_encoder_grad(encoder), factor * aggregator(jacobian), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("name", "scalarizer"), [("gm", GeometricMean()), ("uw", UW(2).double())])
def test_scalarizer_weights_reproduce_its_gradient(name, scalarizer):
    encoder, step = _real()
    stats = step()
    means = torch.stack([loss[stats.mask[t]].mean() for t, loss in enumerate(stats._attached_losses)])
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(scalarizer(means), list(encoder.parameters()))])
    _, lam = make_method(name).weights(stats, epoch=0)
    encoder.zero_grad()
    stats.backward(None, lam, heads=False)
    torch.testing.assert_close(_encoder_grad(encoder), expected)


def test_sgs_ema_state_dict_round_trip():
    first, second, fresh = (make_method("sgs", reference="ema", warmup=0) for _ in range(3))
    encoder, step = _real(seed=1)

    def moved(reference):  # the encoder drifts between steps, so the EMA differs from the batch mean
        with torch.no_grad():
            for p in encoder.parameters():
                p.add_(0.3 * torch.randn_like(p))
        return step(reference)

    torch.manual_seed(0)
    for _ in range(3):
        first.weights(moved(first.reference), epoch=0)
    second.load_state_dict(first.state_dict())
    for _ in range(2):
        stats = moved(first.reference)
        w1, lam1 = first.weights(stats, epoch=0)
        w2, lam2 = second.weights(step(second.reference), epoch=0)
        w3, _ = fresh.weights(step(fresh.reference), epoch=0)
        assert torch.equal(w1, w2) and torch.equal(lam1, lam2) and not torch.equal(w1, w3)
    assert first.reference.steps == 5 and second.reference.steps == 5


def test_sgs_consistency_gives_no_share_to_a_task_without_labels():
    stats = fake_stats(shape=(3, 6, 4))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # task 1 has no labelled sample in this batch
    masked = dataclasses.replace(stats, mask=mask, cosine=stats.cosine.masked_fill(~mask, torch.nan))
    _, lam = make_method("sgs", warmup=0).weights(masked, epoch=0)
    assert lam[1] == 0 and torch.isclose(lam[[0, 2]].mean(), torch.tensor(1.0, dtype=lam.dtype))
    nothing = dataclasses.replace(stats, mask=torch.zeros_like(mask), cosine=torch.full_like(stats.cosine, torch.nan))
    _, lam = make_method("sgs", warmup=0).weights(nothing, epoch=0)
    assert torch.equal(lam, torch.ones_like(lam))
