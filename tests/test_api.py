"""The public contract of the engine: shapes, dtypes, the weighted update, extension points, references."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgs_lab
from sgs_lab.testing import check_grad_rule, compare_stats, oracle_stats

ROOT = Path(__file__).resolve().parents[1]


def _model(dtype=torch.float64, bn=False):
    torch.manual_seed(1)
    encoder = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        *([nn.BatchNorm2d(3)] if bn else []),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 8),
        nn.Tanh(),
    ).to(dtype)
    heads = nn.ModuleDict({"left": nn.Linear(8, 3), "right": nn.Linear(8, 1)}).to(dtype)
    x = torch.randn(7, 1, 4, 4, dtype=dtype)
    y = torch.randint(0, 3, (7,))
    target = torch.randn(7, dtype=dtype)
    return encoder, heads, x, y, target


def _losses(heads, z, y, target):
    return {
        "left": F.cross_entropy(heads["left"](z), y, reduction="none"),
        "right": (heads["right"](z).squeeze(1) - target) ** 2,  # a regression task works like any other
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shapes_dtypes_and_task_order(dtype):
    encoder, heads, x, y, target = _model(dtype)
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute({"right": losses["right"], "left": losses["left"]})
    assert stats.tasks == ("right", "left")
    for name in ("cosine", "dot", "norm", "ref_norm"):
        value = getattr(stats, name)
        assert value.shape == (2, 7) and value.dtype == dtype and not value.requires_grad
    assert stats.task_cosine.shape == (2, 2) and stats.conflict.shape == (7, 2, 2)
    assert torch.allclose(torch.diagonal(stats.task_cosine), torch.ones(2, dtype=dtype))
    assert "GradStats(tasks=['right', 'left'], batch=7" in repr(stats)
    assert repr(probe) == "SampleGradients(Sequential, backend='auto', scope='all')"


@pytest.mark.parametrize("scope", ["all", "last", "output"])
@pytest.mark.parametrize("heads_too", [True, False])
def test_backward_equals_autograd(scope, heads_too):
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder, scope=scope)
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    mask = torch.tensor([True, True, False, True, True, True, False])
    stats = probe.compute(losses, masks={"right": mask})
    w = torch.rand(2, 7, dtype=torch.float64) * 2
    lam = torch.tensor([0.7, 1.3], dtype=torch.float64)
    total = lam[0] * (w[0] * losses["left"]).mean() + lam[1] * (w[1] * losses["right"])[mask].mean()
    params = list(encoder.parameters()) + list(heads.parameters())
    want = torch.autograd.grad(total, params, retain_graph=True)
    stats.backward(w, lam, heads=heads_too)
    for p, g in zip(list(encoder.parameters()), want):
        assert torch.allclose(p.grad, g, atol=1e-10, rtol=1e-6)
    for p, g in zip(list(heads.parameters()), want[len(list(encoder.parameters())) :]):
        if heads_too:
            assert torch.allclose(p.grad, g, atol=1e-10, rtol=1e-6)
        else:
            assert p.grad is None


def test_backward_needs_no_second_pass_through_the_module():
    """Layers with a rule take their update from captured tensors: the module's graph is not traversed again."""
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x)
    stats = probe.compute(_losses(heads, z, y, target))
    calls = []
    for layer in encoder:
        layer.register_full_backward_hook(lambda *_: calls.append(1))
    stats.backward()
    assert calls == []
    assert all(p.grad is not None for p in encoder.parameters())


def test_masked_samples_read_nan_and_stay_out_of_the_reference():
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    mask = torch.tensor([True, False, True, True, False, True, True])
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute(losses, masks={"left": mask})
    assert torch.isnan(stats.cosine[0, ~mask]).all() and torch.isfinite(stats.cosine[0, mask]).all()
    left_out = stats.conflict[~mask]  # every pair that involves the masked task is NaN, the rest is not
    assert torch.isnan(left_out[:, 0, :]).all() and torch.isnan(left_out[:, :, 0]).all()
    assert torch.allclose(left_out[:, 1, 1], torch.ones(2, dtype=torch.float64))
    expected = oracle_stats(losses, list(encoder.parameters()), masks={"left": mask})
    compare_stats(stats, expected)


def test_eval_batchnorm_rule_matches_oracle():
    encoder, heads, x, y, target = _model(bn=True)
    encoder[1].running_mean.uniform_(-1, 1)
    encoder[1].running_var.uniform_(0.5, 2)
    probe = sgs_lab.SampleGradients(encoder, backend="ghost", batchnorm="eval")
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute(losses, labels={"left": y, "right": y}, reference="class")
    encoder.eval()  # the oracle differentiates the same (eval-mode) graph
    compare_stats(stats, oracle_stats(losses, list(encoder.parameters()), {"left": y, "right": y}, "class"))


def test_similarity_to_another_reference_reuses_the_capture():
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    labels = {"left": y, "right": y}
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute(losses, labels=labels, reference="batch")
    other = stats.similarity("class")
    expected = oracle_stats(losses, list(encoder.parameters()), labels, "class")
    assert torch.allclose(other.cosine, expected["cosine"], atol=1e-10)
    assert torch.allclose(other.ref_norm, expected["ref_norm"], atol=1e-10)


def test_class_reference_of_a_lonely_sample_is_zero():
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 0])  # class 1 has a single sample
    with probe.capture():
        z = encoder(x)
    stats = probe.compute(
        _losses(heads, z, labels, target), labels={"left": labels, "right": labels}, reference="class"
    )
    assert stats.cosine[:, 2].eq(0).all() and stats.ref_norm[:, 2].eq(0).all() and stats.dot[:, 2].eq(0).all()
    assert stats.cosine[:, labels != 1].ne(0).all()


def test_user_rule_is_used_and_checked():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return x * self.weight

    x = torch.randn(6, 3, 4)
    with pytest.warns(sgs_lab.SGSFallbackWarning, match="weight"):
        check = sgs_lab.SampleGradients(nn.Sequential(Scale(4)), backend="auto")
        with check.capture():
            z = check.module(x)
        check.compute({"a": z.sum((1, 2))})
    try:

        @sgs_lab.register_grad_rule(Scale)
        def wrong_rule(layer, inputs, grad_output):
            return {"weight": grad_output.sum(1)}  # forgets the input factor

        with pytest.raises(AssertionError, match="differs from the per-sample loop oracle"):
            check_grad_rule(Scale(4), x)

        @sgs_lab.register_grad_rule(Scale)
        def scale_rule(layer, inputs, grad_output):
            return {"weight": (grad_output * inputs[0]).sum(1)}

        errors = check_grad_rule(Scale(4), x)
        assert max(errors.values()) < 1e-12
        probe = sgs_lab.SampleGradients(nn.Sequential(Scale(4)), backend="ghost")
        assert probe.fallback == {}
    finally:
        from sgs_lab.grads import rules

        rules._USER_RULES.pop(Scale, None)


def test_fallback_is_reported_and_exact():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    encoder = encoder.double()
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x)
    losses = {"a": F.cross_entropy(z, y, reduction="none"), "b": z.pow(2).sum(1)}
    with pytest.warns(sgs_lab.SGSFallbackWarning, match=r"\['1.weight'\]"):
        stats = probe.compute(losses)
    assert stats.fallback == ("1.weight",)
    compare_stats(stats, oracle_stats(losses, list(encoder.parameters())))


def test_scope_last_and_param_filter_pick_the_right_parameters():
    encoder, heads, x, y, target = _model()
    last = sgs_lab.SampleGradients(encoder, scope="last")
    assert list(last.params) == ["3.weight", "3.bias"]
    only = sgs_lab.SampleGradients(encoder, params="0.*")
    assert list(only.params) == ["0.weight", "0.bias"]
    with only.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    compare_stats(only.compute(losses), oracle_stats(losses, [encoder[0].weight, encoder[0].bias]))


def test_ema_reference_state_round_trip():
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    ema = sgs_lab.EMAReference(decay=0.5)
    for _ in range(2):
        with probe.capture():
            z = encoder(x)
        stats = probe.compute(_losses(heads, z, y, target), reference=ema)
    assert ema.steps == 2 and "EMAReference(decay=0.5, steps=2)" == repr(ema)
    copy = sgs_lab.EMAReference()
    copy.load_state_dict(ema.state_dict())
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    a = probe.compute(losses, reference=ema)
    b = a.similarity(copy)
    assert torch.allclose(a.cosine, b.cosine)
    first = sgs_lab.EMAReference()
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    assert torch.allclose(probe.compute(losses, reference=first).cosine, probe.compute(losses).cosine)
    with pytest.raises(ValueError, match="tracks tasks"):
        probe.compute({"other": losses["left"]}, reference=ema)
    del stats


def test_bf16_autocast_statistics_accumulate_in_float32():
    encoder, heads, x, y, target = _model(torch.float32)
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        reference = probe.compute(_losses(heads, encoder(x), y, target)).cosine
    with torch.autocast("cpu", dtype=torch.bfloat16), probe.capture():
        z = encoder(x)
        losses = _losses(heads, z.float(), y, target.float())
    stats = probe.compute(losses)
    assert stats.cosine.dtype == torch.float32 and torch.isfinite(stats.cosine).all()
    # bf16 keeps ~3 significant digits: the sign pattern of the similarities survives
    agree = (torch.sign(stats.cosine) == torch.sign(reference)).float().mean()
    assert agree >= 0.85


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_oracle():
    encoder, heads, x, y, target = _model()
    encoder, heads = encoder.cuda(), heads.cuda()
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x.cuda())
    losses = _losses(heads, z, y.cuda(), target.cuda())
    stats = probe.compute(losses)
    assert stats.cosine.device.type == "cuda"
    compare_stats(stats, oracle_stats(losses, list(encoder.parameters())))


def test_environment_yml_lists_every_dependency():
    pyproject = (ROOT / "pyproject.toml").read_text()
    env = (ROOT / "environment.yml").read_text()
    block = re.search(r"dependencies = \[(.*?)\]", pyproject, re.S).group(1)
    test = re.search(r"test = \[(.*?)\]", pyproject, re.S).group(1)
    names = re.findall(r'"([A-Za-z0-9_.-]+)', block + test)
    assert {"torch", "numpy", "tqdm", "pytest", "hypothesis"} <= set(names)
    for name in names:
        assert re.search(rf"^\s*-\s*{re.escape(name)}\b", env, re.M), f"{name} is missing from environment.yml"
    assert "torch==2.13.0" in env


def test_loss_that_taps_an_inner_layer_is_still_exact():
    """A loss may use an inner layer's output directly (not only the module's output): the engine notices."""

    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.outer = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            self.hidden = self.inner(x)
            return self.outer(torch.tanh(self.hidden))

    torch.manual_seed(0)
    encoder = Tapped().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x)
    losses = {"a": z.pow(2).sum(1), "b": torch.sin(encoder.hidden).sum(1) + z.sum(1)}
    compare_stats(probe.compute(losses), oracle_stats(losses, list(encoder.parameters())))


def test_gramian_is_the_gram_matrix_of_the_mean_gradients():
    encoder, heads, x, y, target = _model()
    probe = sgs_lab.SampleGradients(encoder)
    mask = torch.tensor([True, True, False, True, True, True, True])
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute(losses, masks={"right": mask})
    means = [
        torch.autograd.grad(losses["left"].mean(), list(encoder.parameters()), retain_graph=True),
        torch.autograd.grad(losses["right"][mask].mean(), list(encoder.parameters()), retain_graph=True),
    ]
    flat = torch.stack([torch.cat([g.reshape(-1) for g in m]) for m in means])
    assert torch.allclose(stats.gramian, flat @ flat.T, rtol=1e-10, atol=1e-14)


def test_jacobian_rows_are_the_mean_gradients_and_apply_direction_writes_them():
    encoder, heads, x, y, target = _model()
    mask = torch.tensor([True, False, True, True, True, True, True])
    probe = sgs_lab.SampleGradients(encoder)
    with probe.capture():
        z = encoder(x)
    losses = _losses(heads, z, y, target)
    stats = probe.compute(losses, masks={"left": mask})
    params = list(encoder.parameters())
    means = [torch.autograd.grad(losses["left"][mask].mean(), params, retain_graph=True),
             torch.autograd.grad(losses["right"].mean(), params, retain_graph=True)]  # fmt: skip
    jac = stats.jacobian()
    # the same numbers as autograd, block by block (order of the blocks, not of the parameters)
    assert torch.allclose(jac.norm(dim=1), torch.stack([torch.cat([g.reshape(-1) for g in m]).norm() for m in means]))
    assert torch.allclose(jac @ jac.T, stats.gramian)
    total = losses["left"][mask].mean() + losses["right"].mean()
    want = torch.autograd.grad(total, params + list(heads.parameters()), retain_graph=True)
    stats.apply_direction(jac.sum(0))  # the sum of the task gradients is EW's update
    for p, g in zip(params + list(heads.parameters()), want):
        assert torch.allclose(p.grad, g, atol=1e-12)
    with pytest.raises(RuntimeError, match="already called"):
        stats.apply_direction(jac.sum(0))


@pytest.mark.parametrize("method", ["graddrop", "config", "excessmtl"])
def test_jacobian_aggregators_train(method):
    from sgs_lab.data import make_multidigits
    from sgs_lab.train import TrainConfig, fit

    train, test = make_multidigits(128, 64, seed=0)
    result = fit(train, test, TrainConfig(method=method, epochs=1, batch_size=64), progress=False)
    assert 0.0 <= result.test_metrics["left/accuracy"] <= 1.0
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
