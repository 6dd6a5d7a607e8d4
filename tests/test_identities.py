"""DESIGN §3 identities on the engine's outputs: batch mean, leave-one-out and class formulas, bounds, zero
gradients, dtypes, permutation equivariance and task order.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import (
    CONFIGS,
    DTYPE,
    REFS,
    any_model_spec,
    as_expected,
    attach_tasks,
    build_case,
    build_mlp,
    engine_stats,
    fast,
    task_specs,
)
from hypothesis import given
from hypothesis import strategies as st

import sgs_lab
from sgs_lab.testing import compare_stats

ATOL = 1e-6
# torch notes that padding="same" with an even kernel copies the input: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
seeds = st.integers(0, 2**16)
configs = st.sampled_from(sorted(CONFIGS))
scopes = st.sampled_from(["all", "last", "output"])


pytestmark = pytest.mark.usefixtures("one_thread")


def _kwargs(config: str, scope: str) -> dict:
    kwargs = dict(CONFIGS[config], scope=scope)
    if scope == "output":  # no parameters, so no strategies
        kwargs = {"backend": kwargs["backend"], "scope": "output"}
    return kwargs


def _close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = ATOL) -> None:
    """|got − want| ≤ atol · max(1, max |want|), NaN where want is NaN."""
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    finite = ~torch.isnan(want)
    if finite.any():
        scale = max(1.0, float(want[finite].abs().max()))
        err = float((got[finite] - want[finite]).abs().max()) / scale
        assert err <= atol, f"{what}: off by {err:.3g}"


def _kept(case) -> torch.Tensor:
    keep = torch.ones(len(case.tasks), case.batch, dtype=torch.bool)
    for t, task in enumerate(case.tasks):
        if case.masks and task in case.masks:
            keep[t] = case.masks[task]
    return keep


cases = st.builds(build_case, any_model_spec(), task_specs(max_tasks=3), st.integers(1, 8), seeds)


# ----------------------------------------------------------------------------------------------------------
# batch reference: mean_i ⟨G_i, Ḡ⟩ = ‖Ḡ‖², and ‖Ḡ‖² ≤ mean_i ‖G_i‖² (coherence in [0, 1])
@fast(40)
@given(case=cases, config=configs, scope=scopes)
def test_batch_mean_dot_is_reference_norm_squared(case, config, scope):
    stats = engine_stats(case, ("batch",), **_kwargs(config, scope))["batch"]
    keep = _kept(case)
    for t in range(len(case.tasks)):
        kept = keep[t]
        if not kept.any():
            assert torch.isnan(stats.dot[t]).all() and torch.isnan(stats.ref_norm[t]).all()
            continue
        ref = stats.ref_norm[t, kept]
        _close(ref, ref[:1].expand_as(ref), "batch ref_norm is the same for every kept sample")
        ref_sq = ref[0] ** 2
        _close(stats.dot[t, kept].mean(), ref_sq, "mean_i <G_i, mean G> = |mean G|^2")
        mean_sq = stats.norm[t, kept].pow(2).mean()
        assert ref_sq <= mean_sq * (1 + 1e-12) + 1e-300, "coherence |mean G|^2 / mean |G_i|^2 exceeds 1"


# ----------------------------------------------------------------------------------------------------------
# leave-one-out from the batch statistics (DESIGN §3)
def _loo_from_batch(batch_stats, keep):
    n = keep.sum(1, keepdim=True).to(DTYPE)
    dot, sq, ref_sq = batch_stats.dot, batch_stats.norm**2, batch_stats.ref_norm**2
    others = (n - 1).clamp(min=1)
    loo_dot = (n * dot - sq) / others
    loo_ref_sq = (n**2 * ref_sq - 2 * n * dot + sq) / others**2
    alone = (n <= 1).expand_as(dot)
    loo_dot = torch.where(alone & keep, torch.zeros_like(loo_dot), loo_dot)
    loo_ref_sq = torch.where(alone & keep, torch.zeros_like(loo_ref_sq), loo_ref_sq)
    scale = (n**2 * ref_sq + 2 * n * dot.abs() + sq) / others**2  # magnitude of the cancelling terms
    return loo_dot, loo_ref_sq, scale


@fast(40)
@given(case=cases, config=configs, scope=scopes)
def test_leave_one_out_follows_from_batch_statistics(case, config, scope):
    stats = engine_stats(case, ("batch", "loo"), **_kwargs(config, scope))
    keep = _kept(case)
    loo_dot, loo_ref_sq, scale = _loo_from_batch(stats["batch"], keep)
    _close(stats["loo"].dot, loo_dot, "loo dot = (n<G_i, mean G> - |G_i|^2)/(n-1)")
    got_sq = stats["loo"].ref_norm ** 2
    finite = keep
    if finite.any():
        err = (got_sq[finite] - loo_ref_sq[finite]).abs() / scale[finite].clamp(min=1)
        assert float(err.max()) <= ATOL, f"loo |R_i|^2 formula off by {float(err.max()):.3g}"
    _close(stats["loo"].norm, stats["batch"].norm, "norms do not depend on the reference")


@fast(40)
@given(case=cases, config=configs, scope=scopes, ref=st.sampled_from(REFS))
def test_cosine_is_dot_over_norms_and_bounded(case, config, scope, ref):
    stats = engine_stats(case, (ref,), **_kwargs(config, scope))[ref]
    keep = _kept(case)
    denom = stats.norm * stats.ref_norm
    pos = keep & (denom > 0)
    _close(stats.cosine[pos], (stats.dot / denom)[pos], "cosine = dot / (|G_i| |R_i|)")
    assert stats.cosine[keep & ~(denom > 0)].eq(0).all(), "zero norm must give cosine 0"
    assert not torch.isnan(stats.cosine[keep]).any() and not torch.isnan(stats.norm[keep]).any()
    assert torch.isnan(stats.cosine[~keep]).all()
    # conflict: symmetric, NaN exactly where either task masks the sample
    both = keep.T[:, :, None] & keep.T[:, None, :]
    assert torch.equal(torch.isnan(stats.conflict), ~both)
    _close(stats.conflict, stats.conflict.transpose(1, 2), "conflict is symmetric")
    _close(stats.task_cosine, stats.task_cosine.T, "task_cosine is symmetric")
    # the bounds themselves, to the accuracy asked of the engine (and exactly, since it clamps: see the test below)
    for name in ("cosine", "conflict", "task_cosine"):
        values = getattr(stats, name)
        values = values[~torch.isnan(values)]
        assert values.abs().max() <= 1 + ATOL if values.numel() else True, name


@pytest.mark.parametrize(
    "spec, tasks, batch, seed, ref, scope",
    [
        # B = 1, batch reference: the reference is the sample's own gradient (cosine 1 + 2.2e-16)
        (("mlp", (3, 5, 2), (True, True), "tanh"), [("ce", 2, 2, "none")], 1, 3, "batch", "all"),
        # scalar output: all gradients collinear; one small loo reference (cosine -1 - 1.8e-11)
        (("mlp", (5, 2), (True,), "gelu"), [("mse", 1, 1, "none")], 6, 0, "loo", "output"),
    ],
)
def test_cosine_of_collinear_gradients_is_at_most_one(spec, tasks, batch, seed, ref, scope):
    stats = engine_stats(build_case(spec, tasks, batch, seed), (ref,), scope=scope)[ref]
    assert stats.cosine.abs().max() <= 1, f"|cosine| - 1 = {float(stats.cosine.abs().max() - 1):.3g}"


# ----------------------------------------------------------------------------------------------------------
# class reference
@fast(40)
@given(case=cases, config=configs, scope=scopes)
def test_class_reference_with_one_label_is_leave_one_out(case, config, scope):
    case.labels = {task: torch.zeros(case.batch, dtype=torch.long) for task in case.tasks}
    stats = engine_stats(case, ("loo", "class"), **_kwargs(config, scope))
    compare_stats(stats["class"], as_expected(stats["loo"]), atol=ATOL)
    # and through similarity(): same capture, other references
    again = stats["loo"].similarity("class")
    for name in ("cosine", "dot", "ref_norm"):
        _close(getattr(again, name), getattr(stats["class"], name), f"similarity('class').{name}")


@fast(40)
@given(case=cases, config=configs)
def test_singleton_classes_have_no_reference(case, config):
    case.labels = {task: torch.arange(case.batch) for task in case.tasks}
    stats = engine_stats(case, ("class",), **CONFIGS[config])["class"]
    keep = _kept(case)
    for name in ("cosine", "dot", "ref_norm"):
        assert getattr(stats, name)[keep].eq(0).all(), name
        assert torch.isnan(getattr(stats, name)[~keep]).all(), name


@fast(30)
@given(case=cases, config=configs, scope=scopes)
def test_class_reference_is_leave_one_out_within_each_class(case, config, scope):
    """The class statistics of the samples labelled k equal the loo statistics of the sub-batch of class k."""
    kwargs = _kwargs(config, scope)
    full = engine_stats(case, ("class",), **kwargs)["class"]
    task = case.tasks[0]
    for k in case.labels[task].unique():
        idx = (case.labels[task] == k).nonzero().squeeze(1)
        sub = copy.copy(case)
        sub.x = case.x[idx]
        sub.targets = {t: v[idx] for t, v in case.targets.items()}
        sub.labels = {t: v[idx] for t, v in case.labels.items()}
        sub.masks = {t: v[idx] for t, v in case.masks.items()} if case.masks else None
        part = engine_stats(sub, ("loo",), **kwargs)["loo"]
        for name in ("cosine", "dot", "norm", "ref_norm"):
            _close(getattr(part, name)[0], getattr(full, name)[0, idx], f"class {int(k)} {name}")


# ----------------------------------------------------------------------------------------------------------
# zero gradients: cosine 0, never NaN
def _dead_relu_case(batch: int = 5):
    """ReLU MLP whose first sample has only dead units: its gradient is exactly zero."""
    module, x = build_mlp(("mlp", (3, 4, 3), (True, False), "relu"), batch, seed=0)
    with torch.no_grad():
        module[0].weight.abs_()
        module[0].bias.zero_()
        x[0] = -1.0  # every pre-activation negative
        x[1:] = x[1:].abs() + 0.1
    case = attach_tasks(module, x, [("ce", 2, 2, "none"), ("mse", 1, 1, "none")], seed=0)
    return case


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("scope", ["all", "last"])
def test_zero_gradient_sample_has_cosine_zero(config, scope):
    case = _dead_relu_case()
    ema = sgs_lab.EMAReference(0.5)
    stats = engine_stats(case, REFS + (ema,), **_kwargs(config, scope))
    for ref, s in stats.items():
        for name in ("cosine", "dot", "norm"):
            assert not torch.isnan(getattr(s, name)).any(), (ref, name)
            assert getattr(s, name)[:, 0].eq(0).all(), (ref, name)
        assert s.conflict[0].eq(0).all()
        assert (s.norm[:, 1:] > 0).all()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_constant_loss_task_gives_zeros_not_nan(config):
    """A task whose loss does not depend on the module: every gradient, reference and task cosine is 0."""
    case = build_case(("mlp", (3, 4, 2), (True, True), "tanh"), [("ce", 2, 2, "none")], 4, seed=1)
    probe = sgs_lab.SampleGradients(case.module, **CONFIGS[config])
    with probe.capture():
        z = case.module(case.x)
    losses = {"const": 0.0 * z.sum(1) + 1.0, **case.losses(z)}
    labels = {"const": torch.zeros(4, dtype=torch.long), **case.labels}
    for ref in REFS:
        stats = probe.compute(losses, labels=labels, reference=ref)
        for name in ("cosine", "dot", "norm", "ref_norm"):
            assert getattr(stats, name)[0].eq(0).all(), (ref, name)
        assert stats.task_cosine[0].eq(0).all() and stats.task_cosine[:, 0].eq(0).all()
        assert stats.conflict[:, 0].eq(0).all() and stats.conflict[:, :, 0].eq(0).all()
        assert (stats.cosine[1] != 0).any()


# ----------------------------------------------------------------------------------------------------------
# dtypes, devices, detachment
@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("family", ["mlp", "conv", "tokens"])
def test_statistics_dtype_follows_the_module(dtype, expected, config, family):
    spec = {
        "mlp": ("mlp", (3, 4, 2), (True, True), "gelu"),
        "conv": ("conv", 2, 2, 2, (2, 2), (1, 1), (1, 1), "same", "reflect", (4, 4), 2, True, "tanh", 3),
        "tokens": ("tokens", 5, 3, 0, 3, 2, True, True, 2, "mean"),
    }[family]
    case = build_case(spec, [("ce", 2, 2, "random"), ("mse", 1, 1, "none")], 4, seed=2)
    case.module.to(dtype)
    case.heads.to(dtype)
    if case.x.is_floating_point():
        case.x = case.x.to(dtype)
    case.targets = {t: (v.to(dtype) if v.is_floating_point() else v) for t, v in case.targets.items()}
    for ref, stats in engine_stats(case, REFS, **CONFIGS[config]).items():
        for name in ("cosine", "dot", "norm", "ref_norm", "task_cosine", "conflict", "losses"):
            value = getattr(stats, name)
            assert value.dtype == expected, (ref, name, value.dtype)
            assert value.device == torch.device("cpu") and not value.requires_grad, (ref, name)
        assert stats.tasks == tuple(case.tasks)
        assert stats.cosine.shape == stats.dot.shape == stats.norm.shape == (2, 4)
        assert stats.conflict.shape == (4, 2, 2) and stats.task_cosine.shape == (2, 2)


# ----------------------------------------------------------------------------------------------------------
# permutations of samples and of tasks
@fast(30)
@given(case=cases, config=configs, scope=scopes, data=st.data())
def test_permuting_samples_permutes_the_statistics(case, config, scope, data):
    perm = torch.tensor(data.draw(st.permutations(range(case.batch))))
    kwargs = _kwargs(config, scope)
    before = engine_stats(case, REFS, **kwargs)
    moved = copy.copy(case)
    moved.x = case.x[perm]
    moved.targets = {t: v[perm] for t, v in case.targets.items()}
    moved.labels = {t: v[perm] for t, v in case.labels.items()}
    moved.masks = {t: v[perm] for t, v in case.masks.items()} if case.masks else None
    after = engine_stats(moved, REFS, **kwargs)
    for ref in REFS:
        want = as_expected(before[ref])
        want = {
            name: (value if name == "task_cosine" else value[perm] if name == "conflict" else value[:, perm])
            for name, value in want.items()
        }
        compare_stats(after[ref], want, atol=ATOL)


@fast(30)
@given(case=cases, config=configs, data=st.data())
def test_tasks_follow_the_order_of_the_losses(case, config, data):
    order = data.draw(st.permutations(case.tasks))
    probe = sgs_lab.SampleGradients(case.module, **CONFIGS[config])
    with probe.capture():
        z = case.module(case.x)
    losses = case.losses(z)
    idx = torch.tensor([case.tasks.index(t) for t in order])
    for ref in REFS:
        base = probe.compute(losses, labels=case.labels, reference=ref, masks=case.masks)
        shuffled = probe.compute({t: losses[t] for t in order}, labels=case.labels, reference=ref, masks=case.masks)
        assert shuffled.tasks == tuple(order) and base.tasks == tuple(case.tasks)
        want = as_expected(base)
        want = {
            name: value[idx][:, idx]
            if name == "task_cosine"
            else value[:, idx][:, :, idx]
            if name == "conflict"
            else value[idx]
            for name, value in want.items()
        }
        compare_stats(shuffled, want, atol=ATOL)
        assert torch.equal(shuffled.mask, base.mask[idx])


# ----------------------------------------------------------------------------------------------------------
# scale and duplicated tasks
@fast(25)
@given(case=cases, config=configs, scope=scopes, factor=st.sampled_from([0.5, 3.0]))
def test_scaling_a_loss_scales_dot_and_norm_not_cosine(case, config, scope, factor):
    probe = sgs_lab.SampleGradients(case.module, **_kwargs(config, scope))
    with probe.capture():
        z = case.module(case.x)
    losses = case.losses(z)
    scaled = {t: factor * loss for t, loss in losses.items()}
    for ref in REFS:
        base = probe.compute(losses, labels=case.labels, reference=ref, masks=case.masks)
        big = probe.compute(scaled, labels=case.labels, reference=ref, masks=case.masks)
        _close(big.cosine, base.cosine, f"{ref} cosine is scale-free")
        _close(big.dot, factor**2 * base.dot, f"{ref} dot scales with the square")
        _close(big.norm, factor * base.norm, f"{ref} norm scales linearly")
        _close(big.ref_norm, factor * base.ref_norm, f"{ref} ref_norm scales linearly")
        _close(big.task_cosine, base.task_cosine, "task_cosine is scale-free")


@fast(25)
@given(case=cases, config=configs, scope=scopes)
def test_a_duplicated_task_agrees_with_itself(case, config, scope):
    probe = sgs_lab.SampleGradients(case.module, **_kwargs(config, scope))
    with probe.capture():
        z = case.module(case.x)
    loss = case.losses(z)[case.tasks[0]]
    stats = probe.compute({"a": loss, "b": loss})
    _close(stats.cosine[0], stats.cosine[1], "same task, same cosine")
    nonzero = stats.norm[0] > 0
    _close(stats.conflict[nonzero][:, 0, 1], torch.ones(int(nonzero.sum()), dtype=DTYPE), "conflict with itself")
    if (stats.ref_norm[0] > 0).all():
        _close(stats.task_cosine, torch.ones(2, 2, dtype=DTYPE), "task cosine with itself")
