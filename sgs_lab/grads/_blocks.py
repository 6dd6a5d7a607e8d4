"""Blocks: one parameterised piece of a layer with everything needed for exact per-sample statistics.

A block holds, for T tasks and B samples, the per-sample gradients G_{t,i} of some parameters in a form that is
cheap to contract (DESIGN §3). Every block answers the same questions, so statistics are sums over blocks:

- ``cross()``            (B, T, T)  ⟨G_{s,i}, G_{t,i}⟩ — per-sample norms on the diagonal, conflicts off it;
- ``group_dots(ids, K)`` (T, B)     ⟨G_{t,i}, S_{t,k(i)}⟩ with S_{t,k} = Σ_{j: ids[t,j]=k} G_{t,j} (ids −1: left out);
- ``task_gram()``        (T, T)     ⟨S_s, S_t⟩ of the batch sums S_t = Σ_i G_{t,i};
- ``batch_sums()``       (T, *space) the sums themselves, in the block's own parameter space (for EMA references);
- ``ref_dots(R)``        (T, B)     ⟨G_{t,i}, R_t⟩ for a reference R in that space;
- ``accumulate_grad(c)``            adds Σ_t Σ_i c_{t,i} G_{t,i} to the parameters' ``.grad``.

Masked samples arrive with zero output gradients, so they contribute nothing to any sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: Per-sample gradient memory (bytes) a dense block may materialise at once before it works in chunks.
DEFAULT_MEMORY_CAP = 256 * 2**20


@dataclass
class ParamSlot:
    """Where a slice of a block's parameter space lives: ``param[rows]`` viewed as ``shape``."""

    param: nn.Parameter
    shape: torch.Size
    rows: slice = field(default_factory=lambda: slice(None))


def _add_grad(slot: ParamSlot, grad: Tensor) -> None:
    grad = grad.reshape(slot.shape).to(slot.param.dtype)
    if slot.param.grad is None:
        slot.param.grad = torch.zeros_like(slot.param)
    slot.param.grad[slot.rows] += grad


def _group_sums(values: Tensor, ids: Tensor, n_groups: int) -> Tensor:
    """values (B, *space), ids (B,) in [-1, n_groups) → (n_groups, *space) sums; −1 rows dropped."""
    keep = ids >= 0
    out = values.new_zeros((n_groups, *values.shape[1:]))
    return out.index_add_(0, ids[keep], values[keep])


class Block:
    key: str
    tasks: int
    batch: int
    slots: list[ParamSlot]

    def cross(self) -> Tensor:
        raise NotImplementedError

    def group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        raise NotImplementedError

    def task_gram(self) -> Tensor:
        sums = self.batch_sums().flatten(1)
        return sums @ sums.T

    def batch_sums(self) -> Tensor:
        raise NotImplementedError

    def ref_dots(self, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def accumulate_grad(self, coef: Tensor) -> None:
        raise NotImplementedError


class MaterialisedBlock(Block):
    """Per-sample gradients held explicitly: g (T, B, D). Norm-layer affines, fallbacks, the loop oracle."""

    def __init__(self, key: str, g: Tensor, slots: list[ParamSlot]):
        self.key, self.g, self.slots = key, g, slots
        self.tasks, self.batch = g.shape[0], g.shape[1]

    def cross(self) -> Tensor:
        return torch.einsum("sbd,tbd->bst", self.g, self.g)

    def group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        out = []
        for t in range(self.tasks):
            sums = _group_sums(self.g[t], ids[t], n_groups)  # (K, D)
            own = sums[ids[t].clamp(min=0)]  # (B, D)
            out.append((self.g[t] * own).sum(1) * (ids[t] >= 0))
        return torch.stack(out)

    def batch_sums(self) -> Tensor:
        return self.g.sum(1)

    def ref_dots(self, ref: Tensor) -> Tensor:
        return torch.einsum("tbd,td->tb", self.g, ref)

    def accumulate_grad(self, coef: Tensor) -> None:
        flat = torch.einsum("tb,tbd->d", coef.to(self.g.dtype), self.g)
        start = 0
        for slot in self.slots:
            n = slot.shape.numel()
            _add_grad(slot, flat[start : start + n])
            start += n


class DenseBlock(Block):
    """A layer y_{i,p} = W a_{i,p} (+ b) at positions p: G_{t,i} = Σ_p δ_{t,i,p} a_{i,p}ᵀ, never formed unless cheaper.

    ``a`` (B, P, d_in) holds the inputs (a trailing column of ones stands for the bias), ``d`` (T, B, P, d_out) the
    output gradients. Strategy ``gram`` contracts through the position Gram AAᵀ ((BP)² floats, DESIGN §3);
    ``materialise`` forms per-sample gradients in chunks under ``memory_cap`` bytes.
    """

    def __init__(
        self,
        key: str,
        a: Tensor,
        d: Tensor,
        slots: list[ParamSlot],
        strategy: str = "auto",
        memory_cap: int = DEFAULT_MEMORY_CAP,
    ):
        self.key, self.a, self.d, self.slots = key, a, d, slots
        self.tasks, self.batch, self.positions, self.d_out = d.shape
        self.d_in = a.shape[2]
        self.memory_cap, self.requested = memory_cap, strategy
        self.strategy = self.choose_strategy(strategy)
        self._aa: Tensor | None = None  # gram: (BP, BP)
        self._aa_d: Tensor | None = None  # gram: AAᵀ Δ, (T, BP, d_out)
        self._g: Tensor | None = None  # materialise: per-sample gradients when one chunk holds the batch
        self._sums: Tensor | None = None  # (T, d_out, d_in)

    def choose_strategy(self, strategy: str) -> str:
        if strategy != "auto":
            return strategy
        bp, T = self.batch * self.positions, self.tasks
        gram_bytes = bp * bp * self.a.element_size()
        if gram_bytes > self.memory_cap:
            return "materialise"
        gram_cost = bp * bp * (self.d_in + T * self.d_out) + self.batch * self.positions**2 * (self.d_in + T * T * self.d_out)
        materialise_cost = 2 * T * bp * self.d_in * self.d_out
        return "gram" if gram_cost <= materialise_cost else "materialise"

    # -- shared pieces -----------------------------------------------------------------------------------------
    def cross(self) -> Tensor:
        if self.positions == 1:  # ⟨G_s, G_t⟩ = ‖a‖² (δ_s·δ_t)
            a_sq = self.a[:, 0].pow(2).sum(-1)  # (B,)
            dd = torch.einsum("sbo,tbo->bst", self.d[:, :, 0], self.d[:, :, 0])
            return dd * a_sq[:, None, None]
        if self.strategy == "gram":  # ghost norm: ⟨A_i A_iᵀ, Δ_{s,i} Δ_{t,i}ᵀ⟩
            aa = self.a @ self.a.transpose(1, 2)  # (B, P, P)
            dd = torch.einsum("sbpo,tbqo->bstpq", self.d, self.d)
            return torch.einsum("bpq,bstpq->bst", aa, dd)
        out = self.d.new_zeros((self.batch, self.tasks, self.tasks))
        for lo, hi, g in self._chunks():
            flat = g.flatten(2)
            out[lo:hi] = torch.einsum("sbx,tbx->bst", flat, flat)
        return out

    def _flat_d(self) -> Tensor:
        return self.d.reshape(self.tasks, self.batch * self.positions, self.d_out)  # (T, BP, d_out)

    def batch_sums(self) -> Tensor:
        if self._sums is None:
            if self._g is not None:
                self._sums = self._g.sum(1)
            else:
                self._sums = torch.einsum("tno,ni->toi", self._flat_d(), self.a.reshape(-1, self.d_in))
        return self._sums  # (T, d_out, d_in)

    def ref_dots(self, ref: Tensor) -> Tensor:
        # ⟨G_i, R⟩ = Σ_p δ_{i,p}ᵀ R a_{i,p}
        ra = torch.einsum("toi,bpi->tbpo", ref, self.a)
        return (ra * self.d).sum((2, 3))

    def accumulate_grad(self, coef: Tensor) -> None:
        d = (coef.to(self.d.dtype)[:, :, None, None] * self.d).sum(0).reshape(-1, self.d_out)
        grad = d.T @ self.a.reshape(-1, self.d_in)  # (d_out, d_in)
        start = 0
        for slot in self.slots:
            n = slot.shape.numel() // self.d_out
            _add_grad(slot, grad[:, start : start + n])
            start += n

    def task_gram(self) -> Tensor:
        if self.strategy == "gram":
            return torch.einsum("sno,tno->st", self._flat_d(), self._gram_aa_d())
        return super().task_gram()

    def group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        if self.strategy == "gram":
            return self._gram_group_dots(ids, n_groups)
        return self._materialised_group_dots(ids, n_groups)

    # -- gram strategy -----------------------------------------------------------------------------------------
    def _gram_aa(self) -> Tensor:
        if self._aa is None:
            a2 = self.a.reshape(-1, self.d_in)
            self._aa = a2 @ a2.T  # (BP, BP)
        return self._aa

    def _gram_aa_d(self) -> Tensor:
        if self._aa_d is None:
            self._aa_d = self._gram_aa() @ self._flat_d()  # (T, BP, d_out)
        return self._aa_d

    def _gram_group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        d, p = self._flat_d(), self.positions
        out = []
        for t in range(self.tasks):
            if n_groups == 1:  # one group: masked samples already carry zero δ
                aa_d = self._gram_aa_d()[t]
            else:
                same = (ids[t][:, None] == ids[t][None, :]).to(self.a.dtype)  # (B, B)
                if p > 1:
                    same = same.repeat_interleave(p, 0).repeat_interleave(p, 1)
                aa_d = (self._gram_aa() * same) @ d[t]
            out.append((d[t] * aa_d).sum(-1).reshape(self.batch, p).sum(1))
        return torch.stack(out) * (ids >= 0)

    # -- materialise strategy ----------------------------------------------------------------------------------
    def _chunks(self):
        """Yield (lo, hi, G) with G (T, hi−lo, d_out, d_in); a batch that fits in one chunk is formed once."""
        if self._g is not None:
            yield 0, self.batch, self._g
            return
        per_sample = self.tasks * self.d_in * self.d_out * self.a.element_size()
        chunk = max(1, min(self.batch, self.memory_cap // max(per_sample, 1)))
        for lo in range(0, self.batch, chunk):
            hi = min(lo + chunk, self.batch)
            g = torch.einsum("tbpo,bpi->tboi", self.d[:, lo:hi], self.a[lo:hi])
            if chunk == self.batch:
                self._g = g
            yield lo, hi, g

    def _materialised_group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        if n_groups == 1:
            sums = self.batch_sums()[:, None]  # (T, 1, d_out, d_in)
        elif self._g is not None:
            sums = torch.stack([_group_sums(self._g[t], ids[t], n_groups) for t in range(self.tasks)])
        else:
            sums = self.d.new_zeros((self.tasks, n_groups, self.d_out, self.d_in))
            for t in range(self.tasks):
                for k in range(n_groups):
                    idx = (ids[t] == k).nonzero().squeeze(1)
                    sums[t, k] = self.d[t, idx].reshape(-1, self.d_out).T @ self.a[idx].reshape(-1, self.d_in)
        out = self.d.new_zeros((self.tasks, self.batch))
        for lo, hi, g in self._chunks():
            for t in range(self.tasks):
                own = sums[t][ids[t, lo:hi].clamp(min=0)]  # (b, d_out, d_in)
                out[t, lo:hi] = (g[t] * own).sum((1, 2))
        return out * (ids >= 0)


class EmbeddingBlock(Block):
    """An embedding lookup: G_{t,i} = Σ_p e_{idx_{i,p}} δ_{t,i,p}ᵀ, a sparse (V, d) matrix per sample."""

    def __init__(self, key: str, idx: Tensor, d: Tensor, slot: ParamSlot, num_embeddings: int):
        self.key, self.idx, self.d, self.slots, self.vocab = key, idx, d, [slot], num_embeddings
        self.tasks, self.batch, self.positions, self.dim = d.shape

    def cross(self) -> Tensor:
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.d.dtype)  # (B, P, P)
        dd = torch.einsum("sbpo,tbqo->bstpq", self.d, self.d)
        return torch.einsum("bpq,bstpq->bst", same, dd)

    def _scatter(self, d: Tensor, idx: Tensor) -> Tensor:
        """d (n, P, dim), idx (n, P) → (V, dim) summed gradient."""
        out = d.new_zeros((self.vocab, self.dim))
        return out.index_add_(0, idx.reshape(-1), d.reshape(-1, self.dim))

    def batch_sums(self) -> Tensor:
        return torch.stack([self._scatter(self.d[t], self.idx) for t in range(self.tasks)])

    def ref_dots(self, ref: Tensor) -> Tensor:
        gathered = ref[:, self.idx]  # (T, B, P, dim)
        return (gathered * self.d).sum((2, 3))

    def group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        out = torch.zeros(self.tasks, self.batch, dtype=self.d.dtype, device=self.d.device)
        for t in range(self.tasks):
            for k in range(n_groups):
                members = (ids[t] == k).nonzero().squeeze(1)
                if len(members):
                    s = self._scatter(self.d[t, members], self.idx[members])
                    out[t, members] = (s[self.idx[members]] * self.d[t, members]).sum((1, 2))
        return out

    def accumulate_grad(self, coef: Tensor) -> None:
        d = (coef.to(self.d.dtype)[:, :, None, None] * self.d).sum(0)
        _add_grad(self.slots[0], self._scatter(d, self.idx))


def merge_blocks(per_call: list[list[Block]]) -> list[Block]:
    """One layer called several times in a forward: its per-sample gradient is the sum over calls."""
    if len(per_call) == 1:
        return per_call[0]
    merged = []
    for parts in zip(*per_call):
        first = parts[0]
        if isinstance(first, DenseBlock):
            a = torch.cat([p.a for p in parts], 1)  # positions of every call side by side
            d = torch.cat([p.d for p in parts], 2)
            merged.append(DenseBlock(first.key, a, d, first.slots, first.requested, first.memory_cap))
        elif isinstance(first, EmbeddingBlock):
            idx, d = torch.cat([p.idx for p in parts], 1), torch.cat([p.d for p in parts], 2)
            merged.append(EmbeddingBlock(first.key, idx, d, first.slots[0], first.vocab))
        else:
            merged.append(MaterialisedBlock(first.key, sum(p.g for p in parts), first.slots))
    return merged
