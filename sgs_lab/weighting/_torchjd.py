r"""Adapters to `torchjd <https://github.com/TorchJD/torchjd>`_: its Gramian weightings and its scalarizers.

Both give task weights only (sample weights stay 1); the trainer applies them through ``stats.backward``, whose
gradient is :math:`\sum_t \lambda_t \nabla L_t` with :math:`L_t` the mean loss of task :math:`t`.

**Gramian weightings** read ``stats.gramian`` :math:`G_{st} = \langle \bar g_s, \bar g_t \rangle` (the tasks' mean
gradients over the probed parameters: ``scope="all"`` is the usual "shared parameters" setting) and return
:math:`w \in \mathbb{R}^T` such that the method's update is :math:`\sum_t w_t \bar g_t` up to a positive factor.
Convention: :math:`\lambda = T w` for the weightings built around a *mean* (MGDA, IMTL-G, UPGrad, DualProj,
Aligned-MTL, CAGrad, whose :math:`w` sums to 1 for identical gradients) and :math:`\lambda = w` for those built around
a *sum* (PCGrad, GradVac: :math:`w = 1` without conflict) and for FairGrad (whose scale is its own). Either way a
method that sees no conflict gives :math:`\lambda = 1`, i.e. equal weighting (EW). Computed in float64 on the CPU
(the matrix is T × T), returned on the statistics' device and dtype; a non-finite result falls back to EW.

**Scalarizers** see the vector :math:`L` of mean task losses over labelled samples (a detached float64 leaf) and
return :math:`\lambda = \partial s(L) / \partial L`, the task weights the scalarization :math:`s` implies at this
step, so that ``stats.backward`` reproduces the gradient of :math:`s`. UW's and IMTL-L's own parameters are learned by
an internal :class:`torch.optim.Adam` (``lr``, default 1e-3) on :math:`s(L)` once per step, after :math:`\lambda` is
read; FAMO learns its logits in :meth:`~TorchJDScalarizer.after_step` from the losses recomputed after the step;
DWA rolls its epoch averages in :meth:`~TorchJDScalarizer.end_epoch`. A non-finite :math:`\lambda_t` becomes 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torchjd.aggregation as jd_aggregation
import torchjd.scalarization as jd_scalarization
from torch import Tensor

from ._base import SCOPES, Method, check_choice, check_knobs, signature_knobs, snapshot, task_mean_losses, to_cpu


@dataclass(frozen=True)
class _Spec:
    cls: str  # class name in torchjd.aggregation / torchjd.scalarization
    help: str
    defaults: dict = field(default_factory=dict)  # for constructor arguments torchjd requires
    sum_convention: bool = False  # Gramian weightings: λ = w (else λ = T·w)
    learned: bool = False  # scalarizers whose parameters this adapter learns with its own Adam
    private: tuple[str, ...] = ()  # scalarizer attributes to checkpoint


GRAMIAN = {
    "mgda": _Spec("MGDAWeighting", "MGDA (Désidéri 2012; Sener & Koltun 2018): min-norm convex combination"),
    "pcgrad": _Spec("PCGradWeighting", "PCGrad (Yu et al. 2020): project conflicting gradients", sum_convention=True),
    "imtlg": _Spec("IMTLGWeighting", "IMTL-G (Liu et al. 2021): equal projections of the update on every gradient"),
    "upgrad": _Spec("UPGradWeighting", "UPGrad (Quinton & Rey 2024): project onto the dual cone, then average"),
    "alignedmtl": _Spec("AlignedMTLWeighting", "Aligned-MTL (Senushkin et al. 2023): align gradient components"),
    "dualproj": _Spec("DualProjWeighting", "DualProj (GEM, Lopez-Paz & Ranzato 2017): mean projected onto dual cone"),
    "cagrad": _Spec("CAGradWeighting", "CAGrad (Liu et al. 2021): conflict-averse update; needs torchjd[cagrad]", {"c": 0.4}),
    "fairgrad": _Spec("FairGradWeighting", "FairGrad (Ban & Ji 2024): alpha-fair update", {"alpha": 1.0}, True),
    "gradvac": _Spec("GradVacWeighting", "GradVac (Wang et al. 2021): steer pairwise cosines to EMA targets", sum_convention=True),
}  # fmt: skip

SCALARIZERS = {
    "uw": _Spec("UW", "uncertainty weighting (Kendall et al. 2018): learned log-variances", learned=True),
    "dwa": _Spec("DWA", "dynamic weight average (Liu et al. 2019): from epoch loss ratios",
                 private=("_loss_sum", "_n_batches", "_previous_averages")),
    "famo": _Spec("FAMO", "FAMO (Liu et al. 2023): balance loss decrease rates", private=("_prev_losses",)),
    "imtll": _Spec("IMTLL", "IMTL-L (Liu et al. 2021): learned loss scales", learned=True),
    "rlw": _Spec("Random", "random loss weighting (Lin et al. 2022): softmax of Gaussian weights, sum 1"),
    "gm": _Spec("GeometricMean", "geometric mean of the task losses (Chennupati et al. 2019)"),
}  # fmt: skip


AGGREGATORS = {
    "graddrop": _Spec("GradDrop", "GradDrop (Chen et al. 2020): drop gradient components by sign purity"),
    "config": _Spec("ConFIG", "ConFIG (Liu et al. 2024): a conflict-free direction from the task gradients"),
    "excessmtl": _Spec("ExcessMTL", "ExcessMTL (He et al. 2024): robust weights from excess risks"),
    "nashmtl": _Spec("NashMTL", "Nash-MTL (Navon et al. 2022): bargaining solution; needs torchjd[nash-mtl]"),
}  # fmt: skip


EXTRAS = {"cagrad": "cagrad", "nashmtl": "nash-mtl"}  # pip extras of torchjd (spelled with hyphens)


def _build(name: str, cls, options: dict, args: tuple = ()):
    try:
        return cls(*args, **options)
    except ImportError as error:
        hint = f'pip install "torchjd[{EXTRAS.get(name, name)}]"'
        raise ImportError(f"method {name!r} needs an optional solver of torchjd: {hint} ({error})") from error


class TorchJDWeighting(Method):
    """Task weights from a torchjd Gramian weighting of ``stats.gramian`` (see the module docstring)."""

    distributed = True  # the Gramian is over the global batch

    def __init__(self, name: str, *, scope: str = "all", **options) -> None:
        self.name, self.spec = name, GRAMIAN[name]
        cls = getattr(jd_aggregation, self.spec.cls)
        check_knobs(name, options, ["scope", *_ctor_knobs(cls)])
        self.scope = check_choice("scope", scope, SCOPES)
        self.options = {**self.spec.defaults, **options}
        self.weighting = _build(name, cls, self.options)

    def __repr__(self) -> str:
        return f"TorchJDWeighting({self.name!r}, scope={self.scope!r}{_kwargs(self.options)})"

    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        like = stats.cosine
        gramian = stats.gramian.detach().to("cpu", torch.float64)
        gramian = (gramian + gramian.T) / 2  # (T, T), exactly symmetric for the solvers
        n_tasks = gramian.shape[0]
        w = self.weighting(gramian).detach()
        lam = w if self.spec.sum_convention else n_tasks * w
        if not torch.isfinite(lam).all():
            lam = torch.ones_like(lam)
        return None, lam.to(device=like.device, dtype=like.dtype)

    def state_dict(self) -> dict:  # stateful weightings (GradVac) keep their state in buffers
        return snapshot({"buffers": dict(self.weighting._buffers), "key": getattr(self.weighting, "_state_key", None)})

    def load_state_dict(self, state: dict) -> None:
        for key, value in to_cpu(snapshot(state["buffers"])).items():
            setattr(self.weighting, key, value)
        if hasattr(self.weighting, "_state_key"):
            self.weighting._state_key = state["key"]


class TorchJDScalarizer(Method):
    """Task weights :math:`\\partial s(L)/\\partial L` of a torchjd scalarizer :math:`s` (see the module docstring)."""

    def __init__(self, name: str, *, scope: str = "all", **options) -> None:
        self.name, self.spec = name, SCALARIZERS[name]
        self.cls = getattr(jd_scalarization, self.spec.cls)
        ctor = _ctor_knobs(self.cls)
        self.sized = "shape" in ctor  # built at the first step, when T is known
        check_knobs(
            name, options, ["scope", *(k for k in ctor if k != "shape"), *(["lr"] if self.spec.learned else [])]
        )
        self.scope = check_choice("scope", scope, SCOPES)
        self.lr = float(options.pop("lr", 1e-3)) if self.spec.learned else None
        self.options = options
        self.needs_new_losses = hasattr(self.cls, "update")  # FAMO
        self.n_tasks: int | None = None
        self.scalarizer = None if self.sized else _build(name, self.cls, options).double()
        self.optimizer: torch.optim.Optimizer | None = None

    def __repr__(self) -> str:
        lr = {} if self.lr is None else {"lr": self.lr}
        return f"TorchJDScalarizer({self.name!r}, scope={self.scope!r}{_kwargs({**lr, **self.options})})"

    def _ensure(self, n_tasks: int) -> None:
        if self.n_tasks is not None:
            if n_tasks != self.n_tasks:
                raise ValueError(f"{self.name} was built for {self.n_tasks} tasks; got {n_tasks}")
            return
        self.n_tasks = n_tasks
        if self.sized:
            self.scalarizer = _build(self.name, self.cls, self.options, (n_tasks,)).double()
        if self.spec.learned:
            self.optimizer = torch.optim.Adam(self.scalarizer.parameters(), lr=self.lr)

    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        like = stats.cosine
        self._ensure(stats.mask.shape[0])
        values = task_mean_losses(stats).detach().to("cpu", torch.float64).requires_grad_(True)  # (T,)
        params = list(self.scalarizer.parameters()) if self.optimizer is not None else []
        with torch.enable_grad():
            scalar = self.scalarizer(values)
            lam, *grads = torch.autograd.grad(scalar, [values, *params])
        if params:  # one step of the scalarizer's own parameters on s(L)
            for param, grad in zip(params, grads):
                param.grad = grad
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        lam = torch.where(torch.isfinite(lam), lam, torch.zeros_like(lam))
        return None, lam.to(device=like.device, dtype=like.dtype)

    def after_step(self, stats, new_losses: Tensor | None) -> None:
        if self.needs_new_losses and new_losses is not None:
            self.scalarizer.update(new_losses.detach().to("cpu", torch.float64))

    def end_epoch(self, epoch: int) -> None:
        if self.scalarizer is not None and hasattr(self.scalarizer, "step"):  # DWA
            self.scalarizer.step()

    def state_dict(self) -> dict:
        s = self.scalarizer
        inner = getattr(s, "_optimizer", None)  # FAMO's own Adam, created at its first update
        return snapshot({
            "n_tasks": self.n_tasks,
            "module": None if s is None else s.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "private": {k: getattr(s, k) for k in self.spec.private} if s is not None else {},
            "inner_optimizer": None if inner is None else inner.state_dict(),
        })  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        state = to_cpu(snapshot(state))
        if state["n_tasks"] is not None:
            self._ensure(state["n_tasks"])
        if state["module"] is not None:
            self.scalarizer.load_state_dict(state["module"])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for key, value in state["private"].items():
            setattr(self.scalarizer, key, value)
        if state["inner_optimizer"] is not None:  # rebuilt as FAMO.update builds it
            s = self.scalarizer
            s._optimizer = torch.optim.Adam([s._w], lr=s.lr, weight_decay=s.weight_decay)
            s._optimizer.load_state_dict(state["inner_optimizer"])


def _ctor_knobs(cls) -> list[str]:
    """The constructor's keyword names (without ``self``)."""
    return (signature_knobs(cls.__init__) or ["self"])[1:]


def _kwargs(options: dict) -> str:
    return "".join(f", {k}={v!r}" for k, v in options.items())


class TorchJDAggregator(Method):
    """A torchjd aggregator applied to the tasks' mean gradients (``stats.jacobian()``, T × P).

    For methods that need more than the Gramian (GradDrop, ConFIG, ExcessMTL, Nash-MTL): the trainer calls
    :meth:`aggregate` and writes the resulting direction into ``.grad`` with ``stats.apply_direction``; the heads
    get the equally weighted loss. Costs one (T × P) matrix of the probed parameters per step.
    """

    needs_jacobian = True

    def __init__(self, name: str, *, scope: str = "all", **options) -> None:
        self.name, self.spec = name, AGGREGATORS[name]
        self.cls = getattr(jd_aggregation, self.spec.cls)
        ctor = _ctor_knobs(self.cls)
        self.sized = "n_tasks" in ctor  # built at the first step, when T is known
        check_knobs(name, options, ["scope", *(k for k in ctor if k != "n_tasks")])
        self.scope = check_choice("scope", scope, ("all", "last"))
        self.options = options
        self.aggregator = None if self.sized else _build(name, self.cls, options)
        if self.sized:  # fail now, not at the first step, when an optional solver is missing
            _build(name, self.cls, options, (2,))

    def __repr__(self) -> str:
        return f"TorchJDAggregator({self.name!r}, scope={self.scope!r}{_kwargs(self.options)})"

    def weights(self, stats, *, epoch: int) -> tuple[Tensor | None, Tensor | None]:
        return None, None  # the update is the aggregated direction, see aggregate()

    def aggregate(self, jacobian: Tensor) -> Tensor:
        """(T, P) mean task gradients → (P,) update direction."""
        if self.aggregator is None:
            self.aggregator = _build(self.name, self.cls, self.options, (jacobian.shape[0],))
        direction = self.aggregator(jacobian.detach()).detach()
        return direction if torch.isfinite(direction).all() else jacobian.sum(0)
