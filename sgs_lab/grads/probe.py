"""SampleGradients: exact per-sample, per-task gradient statistics over a shared module (DESIGN §3, §5)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _autograd
from ._blocks import DEFAULT_MEMORY_CAP, Block, MaterialisedBlock, ParamSlot, merge_blocks
from .hooks import Recording, record
from .references import REFERENCES, EMAReference
from .rules import _BLOCK_RULES, build_blocks, covered_params
from .stats import GradStats, assemble, module_dtype

BACKENDS = ("auto", "ghost", "batched", "loop")
SCOPES = ("all", "last", "output")


class SGSFallbackWarning(UserWarning):
    """Some parameters have no per-layer rule and are computed by (slower) batched autograd."""


class SampleGradients:
    """Exact per-sample gradient statistics of a shared ``module`` for several per-sample losses.

    Args:
        module: the shared part of the model (the heads stay outside).
        backend: ``"auto"`` (per-layer rules, batched autograd for parameters without one, with a warning),
            ``"ghost"`` (rules only: an error lists uncovered parameters), ``"batched"`` (batched autograd for every
            parameter: per-sample gradients are materialised, T·B·|θ| floats), ``"loop"`` (one backward per sample
            and task: the slow oracle).
        scope: ``"all"`` parameters of the module, the ``"last"`` parameterised layer (in registration order), or
            the ``"output"``: the gradient at the module's output z_i.
        params: keep only parameters whose name matches: a glob (``"layers.2.*"``), a list of globs, or a callable.
        batchnorm: ``"error"`` refuses train-mode BatchNorm (it couples samples); ``"eval"`` switches those layers
            to their running statistics during ``capture()`` and back afterwards.
        strategy: how dense layers are contracted: ``"auto"`` picks per layer by cost, ``"gram"`` or
            ``"materialise"`` force one (for benchmarks and tests).
        memory_cap: bytes of per-sample gradients or Gram matrix a layer may hold at once.
        process_group: in a distributed run (``torch.distributed`` initialised, each process holding a shard of
            the batch), the group whose ranks together hold the *global* batch: references, task Gramian and counts
            are then over the global batch (all-reduced), per-sample dots and norms stay local, and
            ``GradStats.total`` sums over every rank. ``None``: this process holds the whole batch.

    Use::

        probe = SampleGradients(encoder)
        with probe.capture():
            z = encoder(x)
        stats = probe.compute({"left": loss_l, "right": loss_r}, labels=..., reference="batch")
        stats.backward(sample_weights, task_weights)
    """

    def __init__(
        self,
        module: nn.Module,
        backend: str = "auto",
        scope: str = "all",
        *,
        params: str | Sequence[str] | Callable[[str], bool] | None = None,
        batchnorm: str = "error",
        strategy: str = "auto",
        memory_cap: int = DEFAULT_MEMORY_CAP,
        process_group=None,
    ):
        if not isinstance(module, nn.Module):
            raise TypeError(f"SampleGradients needs an nn.Module; got {type(module).__name__}")
        _choice("backend", backend, BACKENDS)
        _choice("scope", scope, SCOPES)
        _choice("batchnorm", batchnorm, ("error", "eval"))
        _choice("strategy", strategy, ("auto", "gram", "materialise"))
        if scope == "output" and params is not None:
            raise ValueError('params= filters parameters; scope="output" uses none')
        self.module, self.backend, self.scope = module, backend, scope
        self.batchnorm, self.strategy, self.memory_cap = batchnorm, strategy, memory_cap
        self.process_group = process_group
        self.dtype = module_dtype(module)
        self._plan(params)
        self._recording: Recording | None = None
        self._capturing = False
        self._warned = False

    def __repr__(self) -> str:
        return f"SampleGradients({type(self.module).__name__}, backend={self.backend!r}, scope={self.scope!r})"

    # -- planning: which parameters, which layers ------------------------------------------------------------
    def _plan(self, params) -> None:
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(f"{type(self.module).__name__} has no trainable parameters: there is nothing to probe")
        self.all_params = trainable
        if self.scope == "output":
            self.params: dict[str, nn.Parameter] = {}
        elif self.scope == "last":
            owners = [(name, m) for name, m in self.module.named_modules() if _own_trainable(m)]
            last, layer = owners[-1]
            prefix = f"{last}." if last else ""
            self.params = {prefix + n: p for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
        else:
            self.params = dict(trainable)
        if params is not None:
            match = _name_filter(params)
            self.params = {n: p for n, p in self.params.items() if match(n)}
            if not self.params:
                raise ValueError(f"params={params!r} matches none of {list(trainable)[:8]}")
        # a parameter shared by two layers must be summed before any norm: leave it to autograd
        owners: dict[int, list[str]] = {}
        for mod_name, m in self.module.named_modules(remove_duplicate=False):
            for n, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{mod_name}.{n}" if mod_name else n)
        shared = {pid for pid, names in owners.items() if len(names) > 1}
        wanted = {id(p) for p in self.params.values()}
        self.layers: dict[str, nn.Module] = {}
        self.layer_params: dict[str, set[str]] = {}
        covered: set[int] = set()
        if self.backend in ("auto", "ghost"):
            for mod_name, m in self.module.named_modules():
                local = {
                    n for n in covered_params(m) if id(getattr(m, n)) in wanted and id(getattr(m, n)) not in shared
                }
                if local:
                    self.layers[mod_name], self.layer_params[mod_name] = m, local
                    covered |= {id(getattr(m, n)) for n in local}
        self.fallback = {n: p for n, p in self.params.items() if id(p) not in covered}
        if self.backend == "ghost" and self.fallback:
            raise ValueError(
                f'backend="ghost" has no rule for {sorted(self.fallback)}; use backend="auto" (batched autograd for '
                "those) or register a rule with sgs_lab.register_grad_rule"
            )

    # -- capture -----------------------------------------------------------------------------------------------
    @contextmanager
    def capture(self) -> Iterator[SampleGradients]:
        """Record the forward of the shared module run inside this block (one batch)."""
        if self._capturing:
            raise RuntimeError("capture() is already active on this probe: nested captures are not supported")
        restore = self._prepare_batchnorm()
        self._capturing = True
        hooked = self.layers if self.backend in ("auto", "ghost") else {}
        try:
            with record(self.module, hooked) as rec:
                self._recording = rec
                yield self
        finally:
            self._capturing = False
            for layer in restore:
                layer.train()

    def _prepare_batchnorm(self) -> list[nn.Module]:
        batch_stats = [
            n for n, m in self.module.named_modules() if isinstance(m, _BatchNorm) and not m.track_running_stats
        ]
        if batch_stats:
            raise ValueError(
                f"BatchNorm layer(s) {batch_stats} have track_running_stats=False: they always normalise with batch "
                "statistics, which mixes samples, so per-sample gradients are not defined. Use LayerNorm or GroupNorm"
            )
        training = [(n, m) for n, m in self.module.named_modules() if isinstance(m, _BatchNorm) and m.training]
        if training and self.batchnorm == "error":
            names = ", ".join(repr(n) for n, _ in training)
            raise ValueError(
                f"BatchNorm layer(s) {names} are in train mode, which mixes samples: per-sample gradients are not "
                'defined. Put them in eval mode, or pass SampleGradients(..., batchnorm="eval") to use their running '
                "statistics during capture()"
            )
        for _, m in training:
            m.eval()
        return [m for _, m in training]

    # -- compute -----------------------------------------------------------------------------------------------
    def compute(
        self,
        losses: dict[str, Tensor],
        labels: dict[str, Tensor] | None = None,
        reference="batch",
        masks: dict[str, Tensor] | None = None,
    ) -> GradStats:
        """Statistics of the captured batch for per-sample ``losses`` {task: (B,)}.

        Args:
            losses: per-sample losses (``reduction="none"``), one (B,) tensor per task, computed from the module's
                output captured by ``capture()``.
            labels: {task: (B,) integer tensor}; needed by ``reference="class"``.
            reference: ``"batch"``, ``"loo"``, ``"class"`` or an :class:`EMAReference`.
            masks: {task: (B,) bool}: False marks a sample without a label for that task; it is left out of that
                task's reference and statistics (NaN in its rows). Tasks without a mask use every sample.
        """
        rec = self._recording
        if rec is None:
            raise RuntimeError("compute() needs a forward inside `with probe.capture():` first")
        if not rec.outputs:
            raise RuntimeError(
                "the captured forward produced no output that requires grad: run the module inside capture() with "
                "gradients enabled (not under torch.no_grad())"
            )
        tasks, loss_list, batch = self._check_losses(losses)
        device = rec.outputs[0].device
        keep = self._check_masks(masks, tasks, batch, device)
        label_tensor = check_labels(labels, tasks, batch, device) if labels is not None else None
        if isinstance(reference, str):
            _choice("reference", reference, REFERENCES)
            if reference == "class" and label_tensor is None:
                raise ValueError('reference="class" needs integer labels: pass labels={task: (B,) tensor}')
        elif not isinstance(reference, EMAReference):
            raise ValueError(f"reference must be one of {list(REFERENCES)} or an EMAReference; got {reference!r}")
        rec.check_unchanged()
        facts = _autograd.inspect_graph(
            tasks,
            loss_list,
            rec.outputs,
            {id(p) for p in self.module.parameters()},
            internal={c.output.grad_fn for calls in rec.calls.values() for c in calls},
            watched={id(getattr(self.layers[name], n)) for name in self.layers for n in self.layer_params[name]},
        )
        if self.scope == "output" and facts.chained_outputs:
            raise ValueError(
                'scope="output" needs independent outputs, but one output of the module is computed from another: '
                'return only the last one, or use scope="all"'
            )
        weights = keep.to(loss_list[0].dtype)
        blocks, fallback = self._blocks(rec, loss_list, weights, batch, facts)
        covered = {id(slot.param) for b in blocks for slot in b.slots}
        if fallback and not self._warned:
            self._warned = True
            warnings.warn(
                f"no per-layer rule applies to {list(fallback)}: computed by batched autograd (exact, slower); "
                "see sgs_lab.register_grad_rule",
                SGSFallbackWarning,
                stacklevel=2,
            )
        return assemble(
            blocks,
            tasks=tasks,
            keep=keep,
            labels=label_tensor,
            reference=reference,
            losses=loss_list,
            dtype=self.dtype,
            autograd_leaves=[p for p in self.all_params.values() if id(p) not in covered],
            head_leaves=facts.head_leaves,
            fallback=fallback,
            group=self.process_group,
        )

    def _blocks(self, rec: Recording, losses: list[Tensor], weights: Tensor, batch: int, facts) -> tuple[list, tuple]:
        """Blocks for the parameters in scope, and the names of those computed by batched autograd."""
        if self.scope == "output":
            grads = _autograd.task_vjp(losses, rec.outputs, weights)
            g = torch.cat([gr.reshape(gr.shape[0], batch, -1) for gr in grads], -1).to(self.dtype)
            return [MaterialisedBlock("output", g, [])], ()
        if self.backend in ("loop", "batched"):
            per_sample = _autograd.per_sample_loop if self.backend == "loop" else _autograd.per_sample_batched
            return _param_blocks(self.params, per_sample(losses, list(self.params.values()), weights), self.dtype), ()
        # a rule sees only its own layer's calls: a parameter that also reaches the losses another way (weight
        # tying through a functional op, a head reusing it) or whose layer never ran goes to batched autograd
        names, missing = {}, dict(self.fallback)
        for name, layer in self.layers.items():
            calls = len(rec.calls.get(name, []))
            names[name] = set()
            for n in self.layer_params[name]:
                param = getattr(layer, n)
                builtin = type(layer) in _BLOCK_RULES
                if calls == 0 or (builtin and facts.consumers.get(id(param), 0) != calls):
                    missing[f"{name}.{n}" if name else n] = param
                else:
                    names[name].add(n)
        if self.backend == "ghost" and missing:
            raise ValueError(
                f'backend="ghost": no rule applies to {sorted(missing)} (used outside its layer, or its layer never '
                'ran); use backend="auto"'
            )
        calls = [call for name in self.layers if names[name] for call in rec.calls.get(name, [])]
        # two stages (heads once each) unless a loss taps a layer directly or one output feeds another
        outputs = None if facts.bypass or facts.chained_outputs else rec.outputs
        grads = _autograd.task_vjp(losses, [c.output for c in calls], weights, outputs) if calls else []
        per_layer: dict[str, list[list[Block]]] = {}
        options = {"dtype": self.dtype, "strategy": self.strategy, "memory_cap": self.memory_cap}
        for call, grad in zip(calls, grads):
            if call.output.shape[0] != batch:
                raise ValueError(
                    f"layer {call.key!r} saw a batch of {call.output.shape[0]} but the losses have {batch} samples; "
                    "the engine expects batch-first tensors in every layer (use batch_first=True layouts)"
                )
            per_layer.setdefault(call.key, []).append(build_blocks(call, grad, names[call.key], options))
        blocks = [b for parts in per_layer.values() for b in merge_blocks(parts)]
        if missing:
            grads = _autograd.per_sample_batched(losses, list(missing.values()), weights)
            blocks += _param_blocks(missing, grads, self.dtype)
        return blocks, tuple(sorted(missing))

    # -- validation --------------------------------------------------------------------------------------------
    def _check_losses(self, losses) -> tuple[tuple[str, ...], list[Tensor], int]:
        if not isinstance(losses, dict) or not losses:
            raise TypeError("losses must be a non-empty dict {task name: per-sample loss tensor of shape (B,)}")
        batch = self._recording.outputs[0].shape[0] if self._recording.outputs[0].dim() else None
        sizes = {}
        for task, loss in losses.items():
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {task!r} is a {type(loss).__name__}, not a tensor")
            if loss.dim() != 1:
                hint = ' (use reduction="none")' if loss.dim() == 0 else " (squeeze it to (B,))"
                raise ValueError(
                    f"loss {task!r} must have shape (B,), one value per sample; got {tuple(loss.shape)}{hint}"
                )
            sizes[task] = loss.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"all tasks must have the same batch size; got {sizes}")
        got = next(iter(sizes.values()))
        if batch is not None and got != batch:
            raise ValueError(f"the losses have {got} samples but the captured forward had a batch of {batch}")
        for task, loss in losses.items():
            bad = int((~torch.isfinite(loss.detach())).sum())
            if bad:
                raise ValueError(f"loss {task!r} has {bad} NaN/Inf value(s): fix the loss (or mask those samples out)")
            if loss.grad_fn is None:
                raise ValueError(f"loss {task!r} is not connected to the captured forward (it has no autograd graph)")
        return tuple(losses), list(losses.values()), got

    def _check_masks(self, masks, tasks, batch, device) -> Tensor:
        keep = torch.ones(len(tasks), batch, dtype=torch.bool, device=device)
        for task, mask in (masks or {}).items():
            if task not in tasks:
                raise ValueError(f"mask for unknown task {task!r}; tasks are {list(tasks)}")
            mask = torch.as_tensor(mask, device=device)
            if mask.dtype != torch.bool or tuple(mask.shape) != (batch,):
                raise ValueError(
                    f"mask {task!r} must be a bool tensor of shape ({batch},); got {mask.dtype} {tuple(mask.shape)}"
                )
            keep[tasks.index(task)] = mask
        return keep


def check_labels(labels: dict[str, Tensor], tasks: Sequence[str], batch: int, device) -> Tensor:
    """{task: (B,) integer labels} → (T, B) long; tasks without labels get −1 (only ``class`` needs them all)."""
    if not isinstance(labels, dict):
        raise TypeError("labels must be a dict {task name: (B,) integer tensor}")
    out = torch.full((len(tasks), batch), -1, dtype=torch.long, device=device)
    for task, y in labels.items():
        if task not in tasks:
            raise ValueError(f"labels for unknown task {task!r}; tasks are {list(tasks)}")
        y = torch.as_tensor(y, device=device)
        if tuple(y.shape) != (batch,):
            raise ValueError(f"labels {task!r} must have shape ({batch},); got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(
                f"labels {task!r} must be integer class ids (got {y.dtype}); the class reference groups by them"
            )
        if (y < 0).any():
            raise ValueError(f"labels {task!r} contain negative ids; mark missing labels with masks instead")
        out[list(tasks).index(task)] = y.long()
    missing = [t for t in tasks if t not in labels]
    if missing:
        raise ValueError(f"labels are missing for task(s) {missing}; give labels for every task")
    return out


def _param_blocks(params: dict[str, nn.Parameter], grads: list[Tensor], dtype) -> list[Block]:
    return [
        MaterialisedBlock(name, g.reshape(g.shape[0], g.shape[1], -1).to(dtype), [ParamSlot(p, p.shape)])
        for (name, p), g in zip(params.items(), grads)
    ]


def _own_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _name_filter(params) -> Callable[[str], bool]:
    if callable(params):
        return params
    patterns = [params] if isinstance(params, str) else list(params)
    return lambda name: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _choice(what: str, value, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(valid)}")
