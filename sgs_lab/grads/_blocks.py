"""Blocks: one parameterised piece of a layer with everything needed for exact per-sample statistics.

A block holds, for T tasks and B samples, the per-sample gradients G_{t,i} of some parameters in a form that is
cheap to contract (DESIGN §3). Every block answers the same questions, so statistics are sums over blocks:

- ``cross()``            (B, T, T)  ⟨G_{s,i}, G_{t,i}⟩ — per-sample norms on the diagonal, conflicts off it;
- ``group_dots(ids, K)`` (T, B)     ⟨G_{t,i}, S_{t,k(i)}⟩ with S_{t,k} = Σ_{j: ids[t,j]=k} G_{t,j} (ids −1: left out);
- ``task_gram()``        (T, T)     ⟨S_s, S_t⟩ of the batch sums S_t = Σ_i G_{t,i};
- ``batch_sums()``       (T, *space) the sums themselves, in the block's own parameter space (for EMA references);
- ``ref_dots(R)``        (T, B)     ⟨G_{t,i}, R_t⟩ for a reference R in that space;
- ``accumulate_grad(c)``            adds Σ_t Σ_i c_{t,i} G_{t,i} to the parameters' ``.grad``;
- ``group_sums(ids, K)``  (T, K, *space) the group sums S_{t,k} themselves, and ``group_ref_dots(S, ids)`` (T, B)
  ⟨G_{t,i}, S_{t,k(i)}⟩ for given sums — what a distributed run all-reduces and contracts (``sgs_lab.distributed``).

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
    if slot.param.grad is None and slot.rows == slice(None):
        slot.param.grad = grad.contiguous()  # a fresh tensor: no zero fill and add
        return
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
        """Add Σ_t Σ_i coef_{t,i} G_{t,i} to the parameters' ``.grad``."""
        raise NotImplementedError

    def group_sums(self, ids: Tensor, n_groups: int) -> Tensor:
        """(T, K, *space): S_{t,k} = Σ_{i: ids[t,i]=k} G_{t,i} in the block's parameter space."""
        if n_groups == 1:  # masked samples carry zero gradients: the batch sum is the group sum
            return self.batch_sums()[:, None]
        raise NotImplementedError

    def group_ref_dots(self, sums: Tensor, ids: Tensor) -> Tensor:
        """(T, B): ⟨G_{t,i}, sums[t, ids[t,i]]⟩ (0 where ids is −1)."""
        if sums.shape[1] == 1:
            return self.ref_dots(sums[:, 0]) * (ids >= 0)
        out = sums.new_zeros(ids.shape)
        for t in range(self.tasks):
            for k in range(sums.shape[1]):
                members = (ids[t] == k).nonzero().squeeze(1)
                if len(members):
                    out[t, members] = self._member_dots(sums[t, k], t, members)
        return out

    def _member_dots(self, ref: Tensor, t: int, members: Tensor) -> Tensor:
        """⟨G_{t,i}, ref⟩ for the samples ``members``."""
        raise NotImplementedError

    def write_grad(self, value: Tensor) -> None:
        """Add ``value``, a tensor in the block's parameter space (one row of ``batch_sums``), to ``.grad``."""
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
            every = self.g[t] @ sums.T  # (B, K): each sample against every group's sum
            out.append(every.gather(1, ids[t].clamp(min=0)[:, None]).squeeze(1))
        return torch.stack(out) * (ids >= 0)

    def batch_sums(self) -> Tensor:
        return self.g.sum(1)

    def ref_dots(self, ref: Tensor) -> Tensor:
        return torch.einsum("tbd,td->tb", self.g, ref)

    def accumulate_grad(self, coef: Tensor) -> None:
        self.write_grad(torch.einsum("tb,tbd->d", coef.to(self.g.dtype), self.g))

    def group_sums(self, ids: Tensor, n_groups: int) -> Tensor:
        return torch.stack([_group_sums(self.g[t], ids[t], n_groups) for t in range(self.tasks)])

    def _member_dots(self, ref: Tensor, t: int, members: Tensor) -> Tensor:
        return self.g[t, members] @ ref

    def write_grad(self, value: Tensor) -> None:
        start = 0
        for slot in self.slots:
            n = slot.shape.numel()
            _add_grad(slot, value[start : start + n])
            start += n


class DenseBlock(Block):
    """A layer y_{i,p} = W a_{i,p} (+ b) at positions p: G_{t,i} = Σ_p δ_{t,i,p} a_{i,p}ᵀ, formed only where cheaper.

    ``a`` (B, P, d_in) holds the inputs (a trailing column of ones stands for the bias), ``d`` (T, B, P, d_out) the
    output gradients. Two strategies (DESIGN §3), picked per layer by cost unless forced:

    - ``gram``: through the position Gram AAᵀ ((BP)² floats, only where that fits under ``memory_cap``);
      per-sample norms by the ghost norm ⟨A_iA_iᵀ, Δ_iΔ_iᵀ⟩ (closed form ‖a_i‖²‖δ_i‖² when P = 1);
    - ``materialise``: in parameter space — reference sums S = Σ δᵀa (a weight gradient), dots ⟨G_i, S⟩ =
      Σ_p δ_{i,p}ᵀ S a_{i,p}; for P > 1 the per-sample gradients are formed (in chunks under ``memory_cap``)
      to get norms and conflicts, and kept when the whole batch fits.
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
        self.key, self.slots = key, slots
        self.a, self.d = a.contiguous(), d.contiguous()  # reshaped many times below: copy once if need be
        self.tasks, self.batch, self.positions, self.d_out = d.shape
        self.d_in = a.shape[2]
        self.memory_cap, self.requested = memory_cap, strategy
        self.strategy = self.choose_strategy(strategy)
        self._aa: Tensor | None = None  # gram: (BP, BP)
        self._aa_d: Tensor | None = None  # gram: AAᵀ Δ, (T, BP, d_out)
        self._g: Tensor | None = None  # materialise, P > 1: per-sample gradients when one chunk holds the batch
        self._sums: Tensor | None = None  # (T, d_out, d_in)

    def choose_strategy(self, strategy: str) -> str:
        bp, P, T = self.batch * self.positions, self.positions, self.tasks
        if bp * bp * self.a.element_size() > self.memory_cap:
            return "materialise"  # the Gram matrix alone would not fit
        if strategy != "auto":
            return strategy
        weight = self.d_in * self.d_out
        gram_cost = bp * bp * (self.d_in + T * self.d_out)
        if P == 1:
            materialise_cost = 2 * T * self.batch * weight
        else:
            gram_cost += self.batch * P * P * (self.d_in + T * T * self.d_out)
            materialise_cost = T * bp * weight + 2 * T * self.batch * weight
        return "gram" if gram_cost <= materialise_cost else "materialise"

    # -- per-sample norms and conflicts ------------------------------------------------------------------------
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

    def _chunks(self):
        """Yield (lo, hi, G) with G (T, hi−lo, d_out, d_in); a batch that fits in one chunk is formed once."""
        if self._g is not None:
            yield 0, self.batch, self._g
            return
        per_sample = self.tasks * self.d_in * self.d_out * self.a.element_size()
        chunk = max(1, min(self.batch, self.memory_cap // max(per_sample, 1)))
        for lo in range(0, self.batch, chunk):
            hi = min(lo + chunk, self.batch)
            a = self.a[lo:hi]
            g = a.new_empty((self.tasks, hi - lo, self.d_out, self.d_in))
            for t in range(self.tasks):  # δᵀa per sample, written in place: no layout copies, no stacking
                torch.bmm(self.d[t, lo:hi].transpose(1, 2), a, out=g[t])
            if chunk == self.batch:
                self._g = g
            yield lo, hi, g

    # -- references --------------------------------------------------------------------------------------------
    def _flat_d(self) -> Tensor:
        return self.d.reshape(self.tasks, self.batch * self.positions, self.d_out)  # (T, BP, d_out)

    def batch_sums(self) -> Tensor:
        if self._sums is None:
            if self._g is not None:
                self._sums = self._g.sum(1)
            else:
                self._sums = self._flat_d().transpose(1, 2) @ self.a.reshape(-1, self.d_in)
        return self._sums  # (T, d_out, d_in)

    def _dots_with(self, refs: Tensor, t: int, members: Tensor | None = None) -> Tensor:
        """⟨G_{t,i}, R⟩ for samples ``members`` (all when None) against one (d_out, d_in) reference."""
        if self._g is not None:
            g = self._g[t] if members is None else self._g[t, members]
            return g.flatten(1) @ refs.flatten()
        d = self.d[t] if members is None else self.d[t, members]
        a = self.a if members is None else self.a[members]
        return ((d @ refs) * a).sum((1, 2))  # Σ_p δ_pᵀ R a_p

    def ref_dots(self, ref: Tensor) -> Tensor:
        return torch.stack([self._dots_with(ref[t], t) for t in range(self.tasks)])

    def task_gram(self) -> Tensor:
        if self.strategy == "gram":
            return torch.einsum("sno,tno->st", self._flat_d(), self._gram_aa_d())
        return super().task_gram()

    def group_dots(self, ids: Tensor, n_groups: int) -> Tensor:
        if self.strategy == "gram":
            return self._gram_group_dots(ids, n_groups)
        out = self.d.new_zeros((self.tasks, self.batch))
        for t in range(self.tasks):
            if n_groups == 1:  # masked samples carry zero δ: the batch sum is the group sum
                out[t] = self._dots_with(self.batch_sums()[t], t)
                continue
            for k in range(n_groups):
                members = (ids[t] == k).nonzero().squeeze(1)
                if len(members):
                    d_k = self.d[t, members].reshape(-1, self.d_out)
                    s_k = d_k.T @ self.a[members].reshape(-1, self.d_in)
                    out[t, members] = self._dots_with(s_k, t, members)
        return out * (ids >= 0)

    def accumulate_grad(self, coef: Tensor) -> None:
        d = (coef.to(self.d.dtype)[:, :, None, None] * self.d).sum(0).reshape(-1, self.d_out)
        self.write_grad(d.T @ self.a.reshape(-1, self.d_in))  # (d_out, d_in)

    def group_sums(self, ids: Tensor, n_groups: int) -> Tensor:
        if n_groups == 1:
            return super().group_sums(ids, n_groups)
        out = self.d.new_zeros((self.tasks, n_groups, self.d_out, self.d_in))
        for t in range(self.tasks):
            for k in range(n_groups):
                members = (ids[t] == k).nonzero().squeeze(1)
                if len(members):  # Σ_{i∈k} Σ_p δ_{i,p} a_{i,p}ᵀ as one matrix product
                    out[t, k] = self.d[t, members].reshape(-1, self.d_out).T @ self.a[members].reshape(-1, self.d_in)
        return out

    def _member_dots(self, ref: Tensor, t: int, members: Tensor) -> Tensor:
        return self._dots_with(ref, t, members)

    def write_grad(self, value: Tensor) -> None:
        start = 0
        for slot in self.slots:
            n = slot.shape.numel() // self.d_out
            _add_grad(slot, value[:, start : start + n])
            start += n

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


class EmbeddingBlock(Block):
    """An embedding lookup: G_{t,i} = Σ_p e_{idx_{i,p}} δ_{t,i,p}ᵀ, a sparse (V, d) matrix per sample."""

    strategy = "scatter"

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
        self.write_grad(self._scatter(d, self.idx))

    def group_sums(self, ids: Tensor, n_groups: int) -> Tensor:
        out = self.d.new_zeros((self.tasks, n_groups, self.vocab, self.dim))
        for t in range(self.tasks):
            for k in range(n_groups):
                members = (ids[t] == k).nonzero().squeeze(1)
                if len(members):
                    out[t, k] = self._scatter(self.d[t, members], self.idx[members])
        return out

    def _member_dots(self, ref: Tensor, t: int, members: Tensor) -> Tensor:
        return (ref[self.idx[members]] * self.d[t, members]).sum((1, 2))

    def write_grad(self, value: Tensor) -> None:
        _add_grad(self.slots[0], value)


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
