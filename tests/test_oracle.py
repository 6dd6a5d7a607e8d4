"""Property tests: every backend, strategy, scope and reference of SampleGradients against the loop oracle.

All numbers are float64 and must agree with ``sgs_lab.testing.oracle_stats`` to 1e-6 (``compare_stats``).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _models import (
    CONFIGS,
    DTYPE,
    REFS,
    RULE_FREE,
    any_model_spec,
    as_expected,
    attach_tasks,
    build_case,
    capture,
    conv_specs,
    engine_stats,
    fast,
    glob_params,
    groupnorm_specs,
    last_layer_params,
    mlp_specs,
    oracle,
    relative_error,
    task_specs,
    token_specs,
    weighted_objective,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sgs_lab
from sgs_lab.testing import compare_stats, oracle_stats, per_sample_gradients

ATOL = 1e-6
# torch notes that padding="same" with an even kernel copies the input: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
batches = st.integers(1, 9)
seeds = st.integers(0, 2**16)


pytestmark = pytest.mark.usefixtures("one_thread")


def check_all_configs(case, configs=tuple(CONFIGS), references=REFS, **probe_kwargs):
    """Every configuration matches the oracle for every reference, and the configurations match each other."""
    expected = {ref: oracle(case, ref) for ref in references}
    results = {}
    for name in configs:
        results[name] = engine_stats(case, references, **CONFIGS[name], **probe_kwargs)
        for ref in references:
            try:
                compare_stats(results[name][ref], expected[ref], atol=ATOL)
            except AssertionError as err:
                raise AssertionError(f"config {name!r}, reference {ref!r}: {err}") from None
    first = configs[0]
    for name, ref in itertools.product(configs[1:], references):
        compare_stats(results[name][ref], as_expected(results[first][ref]), atol=ATOL)
    return results


# ----------------------------------------------------------------------------------------------------------
# model families × every backend / strategy × every reference, with masks
@fast(40)
@given(spec=mlp_specs(), tasks=task_specs(), batch=batches, seed=seeds)
def test_mlp_matches_oracle(spec, tasks, batch, seed):
    check_all_configs(build_case(spec, tasks, batch, seed))


@fast(40)
@given(spec=conv_specs(1), tasks=task_specs(max_tasks=2), batch=batches, seed=seeds)
def test_conv1d_matches_oracle(spec, tasks, batch, seed):
    check_all_configs(build_case(spec, tasks, batch, seed))


@fast(40)
@given(spec=conv_specs(2), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds)
def test_conv2d_matches_oracle(spec, tasks, batch, seed):
    check_all_configs(build_case(spec, tasks, batch, seed))


@fast(40)
@given(spec=token_specs(), tasks=task_specs(max_tasks=3), batch=batches, seed=seeds)
def test_token_model_matches_oracle(spec, tasks, batch, seed):
    check_all_configs(build_case(spec, tasks, batch, seed))


@fast(25)
@given(spec=groupnorm_specs(), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds)
def test_groupnorm_model_matches_oracle(spec, tasks, batch, seed):
    check_all_configs(build_case(spec, tasks, batch, seed))


@pytest.mark.parametrize("mode", ["zero", "one", "all_but_one"])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_extreme_masks_match_oracle(mode, batch):
    """A task with no, one or all-but-one kept sample, next to an unmasked task: NaN rows, zero references."""
    spec = ("mlp", (3, 4, 2), (True, True), "tanh")
    case = build_case(spec, [("ce", 2, 2, mode), ("mse", 1, 1, "none")], batch, seed=batch)
    results = check_all_configs(case, configs=("auto", "loop", "materialise"))
    stats = results["auto"]["batch"]
    kept = case.masks["task0"]
    assert torch.isnan(stats.cosine[0, ~kept]).all() and not torch.isnan(stats.cosine[0, kept]).any()
    if mode == "one":  # one kept sample has no leave-one-out or class reference: defined as 0
        for ref in ("loo", "class"):
            assert results["auto"][ref].cosine[0, kept].eq(0).all()
            assert results["auto"][ref].ref_norm[0, kept].eq(0).all()
    if mode == "zero":  # a task without labelled samples: its mean gradient is 0, so its task cosines read 0
        assert stats.task_cosine[0].eq(0).all() and stats.task_cosine[:, 0].eq(0).all()


# ----------------------------------------------------------------------------------------------------------
# scopes and parameter filters
@fast(30)
@given(spec=any_model_spec(), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds)
def test_scope_last_matches_oracle(spec, tasks, batch, seed):
    case = build_case(spec, tasks, batch, seed)
    params = last_layer_params(case.module)
    expected = {ref: oracle(case, ref, params) for ref in REFS}
    for name in CONFIGS:
        got = engine_stats(case, **CONFIGS[name], scope="last")
        for ref in REFS:
            compare_stats(got[ref], expected[ref], atol=ATOL)


@fast(30)
@given(spec=any_model_spec(), tasks=task_specs(max_tasks=3), batch=st.integers(1, 6), seed=seeds)
def test_scope_output_matches_oracle(spec, tasks, batch, seed):
    case = build_case(spec, tasks, batch, seed)
    expected = {ref: oracle(case, ref, scope="output") for ref in REFS}
    for backend in ("auto", "ghost", "batched", "loop"):
        got = engine_stats(case, backend=backend, scope="output")
        for ref in REFS:
            compare_stats(got[ref], expected[ref], atol=ATOL)


@fast(25)
@given(spec=any_model_spec(), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds)
def test_params_glob_matches_oracle(spec, tasks, batch, seed):
    case = build_case(spec, tasks, batch, seed)
    params = glob_params(case.module, "0.*")
    expected = {ref: oracle(case, ref, params) for ref in REFS}
    for name in CONFIGS:
        got = engine_stats(case, **CONFIGS[name], params="0.*")
        for ref in REFS:
            compare_stats(got[ref], expected[ref], atol=ATOL)


def test_params_bias_only_and_callable_filter():
    case = build_case(("mlp", (3, 5, 4, 2), (True, True, True), "gelu"), [("ce", 2, 2, "random")] * 2, 6, seed=3)
    for pattern, names in (
        ("*.bias", ["0.bias", "2.bias", "4.bias"]),
        (["2.weight", "4.*"], ["2.weight", "4.weight", "4.bias"]),
    ):
        params = [dict(case.module.named_parameters())[n] for n in names]
        expected = {ref: oracle(case, ref, params) for ref in REFS}
        for name in CONFIGS:
            for filt in (pattern, lambda n, names=names: n in names):
                got = engine_stats(case, **CONFIGS[name], params=filt)
                for ref in REFS:
                    compare_stats(got[ref], expected[ref], atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# the weighted update
def check_backward(case, scope="all", configs=tuple(CONFIGS), seed=0, **probe_kwargs):
    gen = torch.Generator().manual_seed(seed)
    n_tasks = len(case.tasks)
    w = torch.rand(n_tasks, case.batch, generator=gen, dtype=DTYPE) * 2
    lam = torch.rand(n_tasks, generator=gen, dtype=DTYPE) + 0.5
    params = case.module_params() + case.head_params()
    want = torch.autograd.grad(
        weighted_objective(case, case.losses(case.module(case.x)), w, lam), params, allow_unused=True
    )
    want = [torch.zeros_like(p) if g is None else g for g, p in zip(want, params)]
    floor = 1e-6 * max(float(g.abs().max()) for g in want)
    names = [f"module.{n}" for n, _ in case.module.named_parameters()] + [
        f"heads.{n}" for n, _ in case.heads.named_parameters()
    ]
    for config in configs:
        for p in params:
            p.grad = None
        stats = engine_stats(case, ("batch",), **CONFIGS[config], scope=scope, **probe_kwargs)["batch"]
        stats.backward(w, lam)
        for name, p, g in zip(names, params, want):
            err = relative_error(p.grad, g, floor)
            assert err <= ATOL, f"config {config!r}, scope {scope!r}: {name}.grad off by {err:.3g} (relative)"
    for p in params:
        p.grad = None


@fast(30)
@given(
    spec=any_model_spec(),
    tasks=task_specs(max_tasks=3),
    batch=st.integers(1, 6),
    seed=seeds,
    scope=st.sampled_from(["all", "last", "output"]),
)
def test_backward_matches_autograd(spec, tasks, batch, seed, scope):
    case = build_case(spec, tasks, batch, seed)
    configs = tuple(CONFIGS) if scope != "output" else ("auto", "ghost", "batched", "loop")
    check_backward(case, scope=scope, configs=configs, seed=seed)


@fast(12)
@given(spec=any_model_spec(), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds)
def test_backward_with_params_filter(spec, tasks, batch, seed):
    check_backward(build_case(spec, tasks, batch, seed), params="0.*", seed=seed)


def test_backward_defaults_are_uniform_weights():
    case = build_case(("mlp", (3, 4, 2), (True, False), "tanh"), [("ce", 2, 2, "random"), ("mse", 2, 1, "none")], 5, 1)
    params = case.module_params() + case.head_params()
    ones = torch.ones(2, case.batch, dtype=DTYPE)
    want = torch.autograd.grad(weighted_objective(case, case.losses(case.module(case.x)), ones, ones[:, 0]), params)
    stats = engine_stats(case, ("batch",))["batch"]
    stats.backward()
    for p, g in zip(params, want):
        assert relative_error(p.grad, g) <= ATOL


# ----------------------------------------------------------------------------------------------------------
# weight sharing and tied parameters
class TwoHalves(nn.Module):
    """One Linear applied to both halves of the input, summed: a layer called twice in one forward."""

    def __init__(self, half: int, width: int, bias: bool):
        super().__init__()
        self.inner = nn.Linear(half, width, bias=bias)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return self.out(torch.tanh(self.inner(left) + self.inner(right)))


class TiedPair(nn.Module):
    """Two Linear modules holding the same weight (tied parameters), and a shared token embedding."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.emb2 = nn.Embedding(vocab, width)
        self.emb2.weight = self.emb.weight
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width, bias=False)
        self.second.weight = self.first.weight

    def forward(self, idx):
        h = self.emb(idx[:, 0]) + self.emb2(idx[:, 1])
        return self.second(torch.tanh(self.first(h)))


@fast(15)
@given(
    half=st.integers(1, 5),
    width=st.integers(1, 6),
    bias=st.booleans(),
    tasks=task_specs(max_tasks=2),
    batch=batches,
    seed=seeds,
)
def test_layer_called_twice_matches_oracle(half, width, bias, tasks, batch, seed):
    torch.manual_seed(seed)
    module = TwoHalves(half, width, bias).to(DTYPE)
    case = attach_tasks(module, torch.randn(batch, 2 * half, dtype=DTYPE), tasks, seed)
    check_all_configs(case)
    check_backward(case, seed=seed, configs=("auto", "gram", "chunked", "loop"))


@fast(15)
@given(width=st.integers(1, 6), vocab=st.integers(2, 6), tasks=task_specs(max_tasks=2), batch=batches, seed=seeds)
def test_tied_parameters_match_oracle(width, vocab, tasks, batch, seed):
    torch.manual_seed(seed)
    module = TiedPair(width, vocab).to(DTYPE)
    case = attach_tasks(module, torch.randint(0, vocab, (batch, 2)), tasks, seed)
    # the tied weights are left to batched autograd (auto warns); ghost refuses them
    probe = sgs_lab.SampleGradients(module)
    losses = capture(case, probe)
    with pytest.warns(sgs_lab.SGSFallbackWarning):
        probe.compute(losses, labels=case.labels, masks=case.masks)
    assert set(probe.fallback) == {"emb.weight", "first.weight"}
    with pytest.raises(ValueError, match="ghost"):
        sgs_lab.SampleGradients(module, backend="ghost")
    check_all_configs(case, configs=("auto", "batched", "loop", "auto-capped"))
    check_backward(case, seed=seed, configs=("auto", "batched", "loop"))


# ----------------------------------------------------------------------------------------------------------
# layers without a rule: batched-autograd fallback, with a warning, still exact
class FunctionalScale(nn.Module):
    """A custom layer with a bare nn.Parameter used through a functional op."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width))
        self.shift = nn.Parameter(torch.randn(width))

    def forward(self, x):
        return F.softplus(x * self.scale) + self.shift


class BilinearModel(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(3, width)
        self.bil = nn.Bilinear(width, 3, width)

    def forward(self, x):
        return self.bil(torch.tanh(self.lin(x)), x)


def fallback_model(kind: str, width: int):
    if kind == "functional":
        return nn.Sequential(nn.Linear(3, width), FunctionalScale(width), nn.Linear(width, width)), {
            "1.scale",
            "1.shift",
        }
    if kind == "prelu":
        return nn.Sequential(nn.Linear(3, width), nn.PReLU(width, init=0.1), nn.Linear(width, width)), {"1.weight"}
    if kind == "bilinear":
        return BilinearModel(width), {"bil.weight", "bil.bias"}

    # a Linear whose weight is only used functionally: its rule never runs, so it falls back at compute time
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, width)

        def forward(self, x):
            return torch.tanh(F.linear(x, self.lin.weight, self.lin.bias))

    return Functional(), set()


@fast(20)
@given(
    kind=st.sampled_from(["functional", "prelu", "bilinear", "silent"]),
    width=st.integers(1, 6),
    tasks=task_specs(max_tasks=2),
    batch=batches,
    seed=seeds,
)
def test_layers_without_rule_fall_back_exactly(kind, width, tasks, batch, seed):
    torch.manual_seed(seed)
    module, fallback = fallback_model(kind, width)
    module = module.to(DTYPE)
    case = attach_tasks(module, torch.randn(batch, 3, dtype=DTYPE), tasks, seed)
    probe = sgs_lab.SampleGradients(module)
    losses = capture(case, probe)
    if fallback:
        with pytest.warns(sgs_lab.SGSFallbackWarning, match="batched autograd"):
            stats = probe.compute(losses, labels=case.labels, reference="loo", masks=case.masks)
        assert set(stats.fallback) == fallback
        with pytest.raises(ValueError, match="ghost"):
            sgs_lab.SampleGradients(module, backend="ghost")
    else:
        stats = probe.compute(losses, labels=case.labels, reference="loo", masks=case.masks)
    compare_stats(stats, oracle(case, "loo"), atol=ATOL)
    check_all_configs(case, configs=RULE_FREE + ("auto-capped",))
    check_backward(case, seed=seed, configs=RULE_FREE)
    check_backward(case, scope="last", seed=seed, configs=RULE_FREE)


# ----------------------------------------------------------------------------------------------------------
# the EMA reference
def _explicit_ema(case_steps, decay):
    """Per step (T, B) statistics against R_k = decay R_{k-1} + (1 - decay) mean_k, R_1 = mean_1."""
    ref, out = None, []
    for case in case_steps:
        losses = case.losses(case.module(case.x))
        g = per_sample_gradients(losses, case.module_params()).detach()  # (T, B, D)
        keep = torch.ones(g.shape[:2], dtype=torch.bool)
        for t, task in enumerate(case.tasks):
            if case.masks and task in case.masks:
                keep[t] = case.masks[task]
        count = keep.sum(1)
        mean = (g * keep[..., None]).sum(1) / count.clamp(min=1)[:, None]
        if ref is None:
            ref = mean
        else:  # a task without labelled samples keeps its reference
            ref = torch.where((count > 0)[:, None], decay * ref + (1 - decay) * mean, ref)
        dot = torch.einsum("tbd,td->tb", g, ref)
        ref_norm = ref.norm(dim=1)[:, None].expand_as(dot)
        norm = g.norm(dim=2)
        denom = norm * ref_norm
        cosine = torch.where(denom > 0, dot / denom.where(denom > 0, torch.ones_like(denom)), torch.zeros_like(dot))
        nan = torch.full_like(dot, float("nan"))
        out.append(
            {
                k: torch.where(keep, v, nan)
                for k, v in {"cosine": cosine, "dot": dot, "ref_norm": ref_norm, "norm": norm}.items()
            }
        )
    return out


@fast(15)
@given(
    spec=any_model_spec(),
    tasks=task_specs(max_tasks=2, mask_modes=("none", "none", "random", "zero")),
    batch=st.integers(1, 6),
    seed=seeds,
    decay=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_ema_reference_matches_explicit_average(spec, tasks, batch, seed, decay):
    base = build_case(spec, tasks, batch, seed)
    steps, gen = [], torch.Generator().manual_seed(seed)
    for k in range(3):  # new parameters and inputs each step
        case = copy.deepcopy(base)
        with torch.no_grad():
            for p in case.module.parameters():
                p.add_(0.2 * k * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if case.x.is_floating_point():
                case.x.add_(0.3 * k * torch.randn(case.x.shape, generator=gen, dtype=case.x.dtype))
        steps.append(case)
    expected = _explicit_ema(steps, decay)
    for config in CONFIGS:
        ema = sgs_lab.EMAReference(decay)
        probe = None
        for k, case in enumerate(steps):
            # one probe and one EMAReference across steps: the module's parameters are updated in place
            if probe is None:
                module = copy.deepcopy(base.module)
                probe = sgs_lab.SampleGradients(module, **CONFIGS[config])
            with torch.no_grad():
                for p, q in zip(module.parameters(), case.module.parameters()):
                    p.copy_(q)
            with probe.capture():
                z = module(case.x)
            stats = probe.compute(case.losses(z), labels=case.labels, reference=ema, masks=case.masks)
            assert ema.steps == k + 1
            for name, want in expected[k].items():
                got = getattr(stats, name)
                assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{config} step {k}: {name} NaN pattern"
                finite = ~torch.isnan(want)
                scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
                err = float((got[finite] - want[finite]).abs().max()) / scale if finite.any() else 0.0
                assert err <= ATOL, f"config {config!r}, step {k}: {name} off by {err:.3g}"


def test_ema_first_step_equals_batch_reference():
    case = build_case(("mlp", (3, 6, 2), (True, True), "relu"), [("ce", 2, 2, "random"), ("mse", 1, 1, "none")], 7, 5)
    ema = engine_stats(case, (sgs_lab.EMAReference(0.9),))
    (stats,) = ema.values()
    compare_stats(stats, oracle(case, "batch"), atol=ATOL)


def test_ema_starts_at_a_tasks_first_labelled_step():
    case = build_case(("mlp", (3, 4, 2), (True, True), "tanh"), [("ce", 2, 2, "none"), ("mse", 1, 1, "none")], 4, 0)
    probe, ema = sgs_lab.SampleGradients(case.module), sgs_lab.EMAReference(0.9)
    for keep in (torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)):
        case.masks = {"task0": keep}
        losses = capture(case, probe)
        stats = probe.compute(losses, labels=case.labels, reference=ema, masks=case.masks)
    # task0 has been labelled once: its reference is that step's mean, as the batch reference
    compare_stats(stats, oracle(case, "batch"), atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# known gaps: a parameter reaching the losses by a path the layer rules do not see (reported to the lead)
class TiedDecoder(nn.Module):
    """Embedding weight reused as the output projection through F.linear (weight tying, as in LMs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, idx):
        return F.linear(torch.tanh(self.lin(self.emb(idx))), self.emb.weight)


def _gap_case(kind: str):
    torch.manual_seed(0)
    if kind == "functional-tie":
        module = TiedDecoder().to(DTYPE)
        case = attach_tasks(module, torch.randint(0, 6, (5, 3)), [("ce", 2, 2, "none")], 0, pool="mean")
    elif kind == "scale_grad_by_freq":
        module = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(9, 2)).to(DTYPE)
        case = attach_tasks(module, torch.randint(0, 5, (4, 3)), [("mse", 1, 1, "none")], 0)
    else:  # module parameter also used by a head
        module = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DTYPE)
        case = attach_tasks(module, torch.randn(5, 3, dtype=DTYPE), [("mse", 1, 1, "none")], 0)
        case.heads["task0"] = nn.Identity()
        shared = module[0].weight
        case.features = lambda z: F.linear(z, shared.T)  # (B, 3): the head multiplies by Wᵀ
    return case


@pytest.mark.parametrize("kind", ["functional-tie", "scale_grad_by_freq", "head-tie"])
def test_parameter_used_outside_its_rule_is_not_silently_wrong(kind):
    """DESIGN §3: 'never silently wrong'. Either exact (as backend='loop' is) or refused / fallen back."""
    case = _gap_case(kind)
    expected = oracle(case, "batch")
    compare_stats(engine_stats(case, ("batch",), backend="loop")["batch"], expected, atol=ATOL)
    with pytest.warns(sgs_lab.SGSFallbackWarning):
        stats = engine_stats(case, ("batch",), quiet=False, backend="auto")["batch"]
    assert stats.fallback  # and it says which parameters took the autograd path
    compare_stats(stats, expected, atol=ATOL)


@pytest.mark.parametrize("kind", ["functional-tie", "scale_grad_by_freq", "head-tie"])
def test_backward_of_a_parameter_used_outside_its_rule(kind):
    case = _gap_case(kind)
    check_backward(case, configs=("loop",))
    check_backward(case, configs=("auto",))


class SequenceFirst(nn.Module):
    """Runs its Linear on a (P, B, d) sequence-first view of a (B, P, d) input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1).flatten(1)


def test_sequence_first_layer_is_refused_when_its_batch_differs():
    """Rules read dim 0 as the batch (README: batch-first layouts). P != B is caught with a pointer to the fix;
    P == B cannot be told apart from a batch-first layout and is a documented limitation."""
    torch.manual_seed(0)
    module = SequenceFirst().to(DTYPE)
    case = attach_tasks(module, torch.randn(4, 3, 3, dtype=DTYPE), [("mse", 1, 1, "none")], 0)
    with pytest.raises(ValueError, match="batch-first"):
        engine_stats(case, ("batch",))


# ----------------------------------------------------------------------------------------------------------
# more module shapes: tuple outputs, frozen and parametrised parameters, BatchNorm in eval statistics
class TwoOutputs(nn.Module):
    """A module returning (z1, z2); ``chained``: z2 is computed from z1 inside the module."""

    def __init__(self, width: int, chained: bool = False):
        super().__init__()
        self.trunk = nn.Linear(3, width)
        self.side = nn.Linear(width if chained else 3, 2)
        self.chained = chained

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return h, self.side(h if self.chained else torch.sin(x))


@fast(15)
@given(width=st.integers(1, 6), batch=batches, seed=seeds, ref=st.sampled_from(REFS))
def test_tuple_output_scope_output_matches_oracle(width, batch, seed, ref):
    """scope="output" over a (z1, z2) output: the per-sample gradient w.r.t. both, concatenated."""
    _check_two_outputs(width, batch, seed, ref, chained=False)


@pytest.mark.parametrize("ref", REFS)
def test_chained_tuple_output_is_refused_for_output_scope_and_exact_over_parameters(ref):
    """z2 = f(z1) inside the module: the gradient "at the output" is ambiguous, so scope="output" refuses it;
    over the parameters every backend stays exact (the engine leaves its two-stage path)."""
    _check_two_outputs(width=2, batch=4, seed=0, ref=ref, chained=True)


def _check_two_outputs(width, batch, seed, ref, chained):
    torch.manual_seed(seed)
    module = TwoOutputs(width, chained).to(DTYPE)
    x = torch.randn(batch, 3, dtype=DTYPE)
    y = torch.randint(0, 2, (batch,))
    labels = {"cls": y, "reg": torch.randint(0, 2, (batch,))}
    head = nn.Linear(width, 1).to(DTYPE)

    def losses(z1, z2):
        return {"cls": F.cross_entropy(z2, y, reduction="none"), "reg": (head(z1).squeeze(1) + z2[:, 0]) ** 2}

    z1, z2 = module(x)
    u1 = torch.zeros(width, dtype=DTYPE, requires_grad=True)
    u2 = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    expected = oracle_stats(losses(z1 + u1, z2 + u2), [u1, u2], labels=labels, reference=ref)
    for backend in ("auto", "ghost", "batched", "loop"):
        probe = sgs_lab.SampleGradients(module, backend=backend, scope="output")
        with probe.capture():
            z1, z2 = module(x)
        if chained:
            with pytest.raises(ValueError, match="independent outputs"):
                probe.compute(losses(z1, z2), labels=labels, reference=ref)
            continue
        compare_stats(probe.compute(losses(z1, z2), labels=labels, reference=ref), expected, atol=ATOL)
    for backend in ("auto", "ghost", "loop"):  # and over the parameters, with both outputs feeding the losses
        probe = sgs_lab.SampleGradients(module, backend=backend)
        with probe.capture():
            z1, z2 = module(x)
        expected = oracle_stats(losses(*module(x)), list(module.parameters()), labels=labels, reference=ref)
        compare_stats(probe.compute(losses(z1, z2), labels=labels, reference=ref), expected, atol=ATOL)


@fast(25)
@given(spec=any_model_spec(), tasks=task_specs(max_tasks=2), batch=st.integers(1, 6), seed=seeds, data=st.data())
def test_frozen_parameters_are_left_out(spec, tasks, batch, seed, data):
    case = build_case(spec, tasks, batch, seed)
    names = [n for n, _ in case.module.named_parameters()]
    frozen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1))
    for n, p in case.module.named_parameters():
        p.requires_grad_(n not in frozen)
    expected = {ref: oracle(case, ref) for ref in REFS}
    for name in CONFIGS:
        got = engine_stats(case, **CONFIGS[name])
        for ref in REFS:
            compare_stats(got[ref], expected[ref], atol=ATOL)
    check_backward(case, seed=seed, configs=("auto", "gram", "chunked", "batched", "loop"))
    for n, p in case.module.named_parameters():
        assert n not in frozen or p.grad is None, f"frozen {n} received a gradient"


def test_parametrised_layer_falls_back_exactly():
    """A weight-normalised Linear: a rule would see the computed weight, so its parameters go to autograd."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.utils.parametrizations.weight_norm(nn.Linear(5, 4)), nn.GELU()
    ).to(DTYPE)
    case = attach_tasks(module, torch.randn(6, 3, dtype=DTYPE), [("ce", 2, 2, "random"), ("mse", 2, 1, "none")], 0)
    with pytest.warns(sgs_lab.SGSFallbackWarning):
        stats = engine_stats(case, ("loo",), quiet=False)["loo"]
    assert set(stats.fallback) == {n for n, _ in module.named_parameters() if n.startswith("2.")}
    compare_stats(stats, oracle(case, "loo"), atol=ATOL)
    check_all_configs(case, configs=RULE_FREE)
    check_backward(case, configs=RULE_FREE)


@pytest.mark.parametrize("config", RULE_FREE)
def test_batchnorm_eval_statistics_match_oracle_in_eval_mode(config):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4)).to(DTYPE)
    with torch.no_grad():
        module[1].running_mean.normal_()
        module[1].running_var.uniform_(0.5, 2.0)
        module[1].weight.normal_()
    case = attach_tasks(module, torch.randn(6, 3, dtype=DTYPE), [("ce", 2, 2, "random"), ("mse", 2, 2, "none")], 0)
    module.eval()
    expected = {ref: oracle(case, ref) for ref in REFS}
    module.train()
    got = engine_stats(case, **CONFIGS[config], batchnorm="eval")
    assert module[1].training, "capture() must put BatchNorm back in train mode"
    for ref in REFS:
        compare_stats(got[ref], expected[ref], atol=ATOL)
