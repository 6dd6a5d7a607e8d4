"""Tiny float64 models, multitask losses and engine/oracle runners shared by the property tests.

A *case* bundles a shared module (the probed encoder), its batched input, one head per task (outside
the module), per-sample losses (cross-entropy or squared error), integer labels for the class reference and
optional masks. Specs are plain tuples drawn by hypothesis (failures shrink to small, readable examples);
``build_*`` turn a spec and a seed into a case.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import sgs_lab
from sgs_lab.testing import STATISTICS, oracle_stats

#: SGS_TEST_EXAMPLES=20 runs twenty times the default number of hypothesis examples (a deeper search)
EXAMPLES_SCALE = float(os.environ.get("SGS_TEST_EXAMPLES", "1"))


def fast(max_examples: int) -> settings:
    """Hypothesis settings: no deadline (shared machine), examples scaled by SGS_TEST_EXAMPLES."""
    return settings(
        deadline=None,
        max_examples=max(1, round(max_examples * EXAMPLES_SCALE)),
        suppress_health_check=[HealthCheck.too_slow],
    )


DTYPE = torch.float64
REFS = ("batch", "loo", "class")
ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU}

#: every engine configuration that must agree with the oracle: name → SampleGradients keyword arguments
CONFIGS = {
    "auto": {"backend": "auto"},
    "ghost": {"backend": "ghost"},
    "batched": {"backend": "batched"},
    "loop": {"backend": "loop"},
    "gram": {"backend": "ghost", "strategy": "gram"},
    "materialise": {"backend": "ghost", "strategy": "materialise"},
    "chunked": {"backend": "ghost", "strategy": "materialise", "memory_cap": 1},  # one sample per chunk
    "auto-capped": {"backend": "auto", "memory_cap": 1},  # auto strategy pushed to chunked materialisation
}
#: configurations that need no per-layer rule (usable for any module)
RULE_FREE = ("auto", "batched", "loop")


# ----------------------------------------------------------------------------------------------------------
# cases
@dataclass
class Case:
    module: nn.Module
    x: torch.Tensor
    heads: nn.ModuleDict
    kinds: dict[str, str]  # task → "ce" | "mse"
    targets: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # integer labels (class reference)
    masks: dict[str, torch.Tensor] | None
    pool: str = "none"  # how the head reads a (B, P, d) output: "mean" | "flatten"
    extra: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.kinds)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def features(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            return z
        return z.mean(1) if self.pool == "mean" else z.flatten(1)

    def losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(z)
        out = {}
        for task, kind in self.kinds.items():
            logits = self.heads[task](f)
            if kind == "ce":
                out[task] = F.cross_entropy(logits, self.targets[task], reduction="none")
            else:
                out[task] = (logits - self.targets[task]).pow(2).sum(1)
        return out

    def module_params(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def head_params(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def task_specs(max_tasks: int = 4, mask_modes=("none", "none", "random", "all_but_one", "one", "zero")):
    """[(kind, n_out, n_labels, mask_mode)] per task."""
    task = st.tuples(
        st.sampled_from(["ce", "mse"]),
        st.integers(1, 3),
        st.integers(1, 3),
        st.sampled_from(mask_modes),
    )
    return st.lists(task, min_size=1, max_size=max_tasks)


def _make_mask(mode: str, batch: int, gen: torch.Generator) -> torch.Tensor | None:
    if mode == "none":
        return None
    if mode == "random":
        return torch.rand(batch, generator=gen) < 0.7
    mask = torch.zeros(batch, dtype=torch.bool)
    if mode == "zero":
        return mask
    pos = int(torch.randint(0, batch, (1,), generator=gen))
    if mode == "one":
        mask[pos] = True
        return mask
    mask[:] = True  # all_but_one
    mask[pos] = False
    return mask


def attach_tasks(module: nn.Module, x: torch.Tensor, tasks, seed: int, pool: str = "none", extra=None) -> Case:
    """Heads, targets, labels and masks for ``tasks`` (see ``task_specs``) on the module's output."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        z = module(x)
    feat = z.shape[1] if z.dim() == 2 else (z.shape[-1] if pool == "mean" else z[0].numel())
    batch = x.shape[0]
    heads, kinds, targets, labels, masks = nn.ModuleDict(), {}, {}, {}, {}
    torch.manual_seed(seed + 2)
    for t, (kind, n_out, n_labels, mask_mode) in enumerate(tasks):
        name = f"task{t}"
        kinds[name] = kind
        if kind == "ce":
            n_cls = n_out + 1  # 2..4 classes, few, so single-member classes happen
            heads[name] = nn.Linear(feat, n_cls).to(DTYPE)
            targets[name] = torch.randint(0, n_cls, (batch,), generator=gen)
            labels[name] = targets[name]
        else:
            heads[name] = nn.Linear(feat, n_out).to(DTYPE)
            targets[name] = torch.randn(batch, n_out, generator=gen, dtype=DTYPE)
            labels[name] = torch.randint(0, n_labels, (batch,), generator=gen)
        mask = _make_mask(mask_mode, batch, gen)
        if mask is not None:
            masks[name] = mask
    return Case(module, x, heads, kinds, targets, labels, masks or None, pool, extra or {})


# ----------------------------------------------------------------------------------------------------------
# model families: spec strategies and builders
@st.composite
def mlp_specs(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 12), min_size=depth + 1, max_size=depth + 1))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    return ("mlp", tuple(widths), tuple(biases), act)


def build_mlp(spec, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    _, widths, biases, act = spec
    torch.manual_seed(seed)
    layers = []
    for i, bias in enumerate(biases):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=bias), ACTIVATIONS[act]()]
    module = nn.Sequential(*layers).to(DTYPE)
    return module, torch.randn(batch, widths[0], dtype=DTYPE)


@st.composite
def conv_specs(draw, dims: int):
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    choices = [0, 1, 2, "valid"] + (["same"] if all(s == 1 for s in stride) else [])
    padding = draw(st.sampled_from(choices))
    if isinstance(padding, int) and dims == 2 and draw(st.booleans()):
        padding = (padding, draw(st.integers(0, 2)))  # asymmetric per-dimension padding
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    size = tuple(draw(st.integers(max(3, d * (k - 1) + 1), 9 if dims == 1 else 7)) for k, d in zip(kernel, dilation))
    bias = draw(st.booleans())
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    width = draw(st.integers(1, 6))
    return (
        "conv",
        dims,
        c_in,
        c_out,
        kernel,
        stride,
        dilation,
        padding,
        mode,
        size,
        groups,
        bias,
        act,
        width,
    )


def build_conv(spec, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    _, dims, c_in, c_out, kernel, stride, dilation, padding, mode, size, groups, bias, act, width = spec
    torch.manual_seed(seed)
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    ).to(DTYPE)
    x = torch.randn(batch, c_in, *size, dtype=DTYPE)
    with torch.no_grad():
        n_flat = conv(x[:1]).numel()
    module = nn.Sequential(conv, ACTIVATIONS[act](), nn.Flatten(), nn.Linear(n_flat, width).to(DTYPE))
    return module, x


@st.composite
def token_specs(draw):
    vocab = draw(st.integers(2, 8))
    # LayerNorm over 1 feature is constant and over 2 features gives x̂ = ±(1, -1): then per-sample gradients
    # of the next layer can cancel to rounding noise, whose cosine is meaningless
    dim = draw(st.integers(3, 6))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    tokens = draw(st.integers(1, 6))
    out = draw(st.integers(1, 6))
    norm_bias = draw(st.booleans())
    lin_bias = draw(st.booleans())
    norm_dims = draw(st.sampled_from([1, 1, 2]))  # LayerNorm over (d,) or over (P, d)
    pool = draw(st.sampled_from(["mean", "flatten"]))
    return ("tokens", vocab, dim, padding_idx, tokens, out, norm_bias, lin_bias, norm_dims, pool)


def build_tokens(spec, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    _, vocab, dim, padding_idx, tokens, out, norm_bias, lin_bias, norm_dims, _ = spec
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Embedding(vocab, dim, padding_idx=padding_idx),
        nn.LayerNorm((tokens, dim)[-norm_dims:], bias=norm_bias),
        nn.Linear(dim, out, bias=lin_bias),
    ).to(DTYPE)
    with torch.no_grad():  # LayerNorm's affine starts at (1, 0): move it so its gradients are generic
        for p in module[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, vocab, (batch, tokens))
    if padding_idx is not None:
        idx[0, 0] = padding_idx  # make sure the padding row is looked up
    return module, idx


@st.composite
def groupnorm_specs(draw):
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 2))
    affine = draw(st.booleans())
    size = draw(st.integers(2, 5))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    width = draw(st.integers(1, 6))
    return ("groupnorm", groups, channels, affine, size, act, width)


def build_groupnorm(spec, batch: int, seed: int) -> tuple[nn.Module, torch.Tensor]:
    _, groups, channels, affine, size, act, width = spec
    torch.manual_seed(seed)
    module = nn.Sequential(  # a conv bias with one channel per group is normalised away: its gradient is 0
        nn.Conv2d(2, channels, 3, padding=1, bias=channels > groups),
        nn.GroupNorm(groups, channels, affine=affine),
        ACTIVATIONS[act](),
        nn.Flatten(),
        nn.Linear(channels * size * size, width),
    ).to(DTYPE)
    if affine:
        with torch.no_grad():
            for p in module[1].parameters():
                p.add_(0.3 * torch.randn_like(p))
    return module, torch.randn(batch, 2, size, size, dtype=DTYPE)


BUILDERS = {"mlp": build_mlp, "conv": build_conv, "tokens": build_tokens, "groupnorm": build_groupnorm}


def any_model_spec():
    return st.one_of(mlp_specs(), conv_specs(1), conv_specs(2), token_specs(), groupnorm_specs())


def build_case(spec, tasks, batch: int, seed: int) -> Case:
    module, x = BUILDERS[spec[0]](spec, batch, seed)
    pool = spec[-1] if spec[0] == "tokens" else "none"
    return attach_tasks(module, x, tasks, seed, pool=pool)


# ----------------------------------------------------------------------------------------------------------
# running the engine and the oracle
def last_layer_params(module: nn.Module) -> list[nn.Parameter]:
    """The last parameterised layer (registration order) — its own trainable parameters."""
    owners = [m for _, m in module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return [p for p in owners[-1].parameters(recurse=False) if p.requires_grad]


def glob_params(module: nn.Module, pattern: str) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if p.requires_grad and fnmatch.fnmatchcase(n, pattern)]


def capture(case: Case, probe: sgs_lab.SampleGradients) -> dict[str, torch.Tensor]:
    with probe.capture():
        z = case.module(case.x)
    return case.losses(z)


def engine_stats(case: Case, references=REFS, *, quiet: bool = True, **probe_kwargs) -> dict:
    """{reference: GradStats} from one capture (compute called once per reference)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", sgs_lab.SGSFallbackWarning)
        probe = sgs_lab.SampleGradients(case.module, **probe_kwargs)
        losses = capture(case, probe)
        return {ref: probe.compute(losses, labels=case.labels, reference=ref, masks=case.masks) for ref in references}


def oracle(case: Case, reference: str, params=None, scope: str = "all") -> dict[str, torch.Tensor]:
    """The loop oracle over ``params`` (default: every module parameter); ``scope="output"``: over z_i."""
    z = case.module(case.x)
    if scope == "output":
        # ∂ℓ_i/∂u for z + u (u = 0, broadcast over the batch) is Σ_j ∂ℓ_i/∂z_j = ∂ℓ_i/∂z_i: samples are
        # independent
        u = torch.zeros(z.shape[1:], dtype=z.dtype, requires_grad=True)
        return oracle_stats(case.losses(z + u), [u], labels=case.labels, reference=reference, masks=case.masks)
    params = case.module_params() if params is None else params
    return oracle_stats(case.losses(z), params, labels=case.labels, reference=reference, masks=case.masks)


def as_expected(stats) -> dict[str, torch.Tensor]:
    """A GradStats as an oracle-style dict (to compare two engine results with ``compare_stats``)."""
    return {name: getattr(stats, name).detach().cpu() for name in STATISTICS}


def weighted_objective(case: Case, losses: dict, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Σ_t λ_t mean_{i kept}(w_{t,i} ℓ_{t,i}), the loss ``stats.backward(w, λ)`` differentiates."""
    total = 0.0
    for t, (task, loss) in enumerate(losses.items()):
        keep = case.masks.get(task) if case.masks else None
        keep = torch.ones_like(loss, dtype=torch.bool) if keep is None else keep
        n = max(int(keep.sum()), 1)
        total = total + lam[t] * (w[t] * loss * keep.to(loss.dtype)).sum() / n
    return total


def relative_error(got: torch.Tensor | None, want: torch.Tensor, floor: float = 0.0) -> float:
    """max |got − want| / max(max |want|, floor): relative, except for gradients that are rounding noise (a
    bias followed by a normalisation): pass ``floor`` = 1e-6 × the largest gradient of the model for those."""
    got = torch.zeros_like(want) if got is None else got
    if not want.numel():
        return 0.0
    scale = max(float(want.abs().max()), floor)
    err = float((got - want).abs().max())
    return err / scale if scale > 0 else err / 1e-12
