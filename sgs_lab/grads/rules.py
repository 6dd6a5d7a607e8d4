"""Per-layer rules: from a layer's captured inputs and output gradients to blocks (see ``_blocks``).

Built-in rules cover ``nn.Linear`` (any leading dims), ``nn.Conv1d``/``nn.Conv2d`` (stride, padding, dilation,
groups, padding modes), ``nn.Embedding``, and the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and
eval-mode ``nn.BatchNorm1d/2d/3d``.
Rules match the layer's exact type: a subclass may change ``forward`` and would be silently wrong otherwise.

Users add layers with :func:`register_grad_rule`; such a rule returns per-sample gradients, which the engine
contracts like any other, and :func:`sgs_lab.testing.check_grad_rule` checks it against the loop oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._blocks import Block, DenseBlock, EmbeddingBlock, MaterialisedBlock, ParamSlot


@dataclass
class Call:
    """One captured call of a layer: detached inputs, the (attached) output, and options for building blocks."""

    key: str
    layer: nn.Module
    inputs: tuple
    output: Tensor


# A block rule: (call, output gradients (T, *output.shape), local names of parameters in scope, options) → blocks.
BlockRule = Callable[[Call, Tensor, set, dict], list[Block]]
_BLOCK_RULES: dict[type, BlockRule] = {}
_USER_RULES: dict[type, Callable] = {}


def register_grad_rule(*layer_types: type) -> Callable:
    """Register a per-sample gradient rule for one or more layer types (exact type match).

    The rule is ``rule(layer, inputs, grad_output) -> {param_name: per_sample_grad}`` where ``inputs`` is the tuple of
    positional inputs of the layer's forward, ``grad_output`` (B, *output.shape[1:]) is the gradient of the summed
    per-sample loss of one task at the layer's output, and each per-sample gradient has shape (B, *param.shape).
    Parameters a rule leaves out are computed by batched autograd. Check a rule with
    :func:`sgs_lab.testing.check_grad_rule`::

        @sgs_lab.register_grad_rule(Scale)
        def scale_rule(layer, inputs, grad_output):
            return {"weight": (grad_output * inputs[0]).flatten(2).sum(-1)}
    """
    if not layer_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
        raise TypeError("register_grad_rule takes one or more nn.Module subclasses, e.g. @register_grad_rule(MyLayer)")

    def decorator(fn: Callable) -> Callable:
        for layer_type in layer_types:
            _USER_RULES[layer_type] = fn
            _BLOCK_RULES.pop(layer_type, None)
        return fn

    return decorator


def _block_rule(*layer_types: type) -> Callable[[BlockRule], BlockRule]:
    def decorator(fn: BlockRule) -> BlockRule:
        for layer_type in layer_types:
            _BLOCK_RULES[layer_type] = fn
        return fn

    return decorator


def covered_params(layer: nn.Module) -> set[str]:
    """Local names of the parameters of ``layer`` that a rule computes (empty when none applies)."""
    if parametrize.is_parametrized(layer):  # the rule would see the computed weight, not the parameters
        return set()
    if isinstance(layer, nn.Embedding) and (layer.scale_grad_by_freq or layer.sparse):
        return set()  # frequency scaling couples the samples of a batch; sparse gradients take the autograd path
    names = {name for name, _ in layer.named_parameters(recurse=False)}
    if type(layer) in _BLOCK_RULES:
        return names & {"weight", "bias"}
    if type(layer) in _USER_RULES:
        return names
    return set()


def build_blocks(call: Call, grad_output: Tensor, names: set[str], options: dict) -> list[Block]:
    layer_type = type(call.layer)
    if layer_type in _BLOCK_RULES:
        return _BLOCK_RULES[layer_type](call, grad_output, names, options)
    return _user_blocks(call, grad_output, names, options)


def _user_blocks(call: Call, grad_output: Tensor, names: set[str], options: dict) -> list[Block]:
    fn = _USER_RULES[type(call.layer)]
    params = dict(call.layer.named_parameters(recurse=False))
    per_task = [fn(call.layer, call.inputs, grad_output[t]) for t in range(grad_output.shape[0])]
    chosen = [n for n in sorted(names) if n in per_task[0]]
    batch = grad_output.shape[1]
    for n in chosen:
        got = tuple(per_task[0][n].shape)
        if got != (batch, *params[n].shape):
            raise ValueError(
                f"the grad rule for {type(call.layer).__name__} returned {n!r} of shape {got}; expected "
                f"{(batch, *params[n].shape)} (batch first, then the parameter's shape)"
            )
    g = torch.stack([torch.cat([task[n].reshape(batch, -1) for n in chosen], 1) for task in per_task])
    slots = [ParamSlot(params[n], params[n].shape) for n in chosen]
    return [MaterialisedBlock(call.key, g.to(options["dtype"]), slots)]


def _dense(
    call: Call, key: str, x: Tensor, d: Tensor, weight, bias, names, options, rows=slice(None), prepared=False
) -> DenseBlock:
    """x (B, P, d_in), d (T, B, P, d_out) → a DenseBlock over the weight and/or bias rows in scope.

    ``prepared``: x already carries the column of ones for the bias when the bias is in scope.
    """
    slots = []
    if "weight" in names:
        slots.append(ParamSlot(weight, weight[rows].shape, rows))
    if "bias" in names and bias is not None:
        slots.append(ParamSlot(bias, bias[rows].shape, rows))
    if prepared:
        a = x
    elif len(slots) == 2:  # weight and bias: one copy of x with a column of ones
        a = x.new_empty(x.shape[:2] + (x.shape[2] + 1,))
        a[..., :-1] = x
        a[..., -1] = 1
    elif "weight" in names:
        a = x.contiguous()
    else:
        a = x.new_ones(x.shape[:2] + (1,))
    return DenseBlock(key, a, d, slots, options["strategy"], options["memory_cap"])


@_block_rule(nn.Linear)
def linear_rule(call: Call, grad_output: Tensor, names: set, options: dict) -> list[Block]:
    layer, dtype = call.layer, options["dtype"]
    x = call.inputs[0].to(dtype)
    batch = x.shape[0]
    a = x.reshape(batch, -1, layer.in_features)  # (B, P, d_in)
    d = grad_output.to(dtype).reshape(grad_output.shape[0], batch, -1, layer.out_features)  # (T, B, P, d_out)
    return [_dense(call, call.key, a, d, layer.weight, layer.bias, names, options)]


def _conv_input(layer: nn.Module, x: Tensor, dims: int) -> tuple[Tensor, tuple, tuple, tuple]:
    """Pad x as the layer does and return it as 2-D (B, C, H, W) with kernel, stride and dilation as pairs."""
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    elif layer.padding == "same":
        pads = []
        for k, dil in zip(reversed(kernel), reversed(dilation)):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
    elif layer.padding != "valid":
        x = F.pad(x, [p for p in reversed(layer.padding) for _ in range(2)])
    if dims == 1:
        return x.unsqueeze(2), (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    return x, tuple(kernel), tuple(stride), tuple(dilation)


@_block_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(call: Call, grad_output: Tensor, names: set, options: dict) -> list[Block]:
    layer, dtype = call.layer, options["dtype"]
    dims = 1 if isinstance(layer, nn.Conv1d) else 2
    x = call.inputs[0].to(dtype)
    if x.dim() == dims + 1:  # unbatched input
        raise ValueError(f"layer {call.key!r} got an unbatched input of shape {tuple(x.shape)}; pass (B, C, ...)")
    x, kernel, stride, dilation = _conv_input(layer, x, dims)
    batch, groups, tasks = x.shape[0], layer.groups, grad_output.shape[0]
    weight_bytes = tasks * batch * layer.weight.numel() * x.element_size()
    if groups == 1 and options["strategy"] != "gram" and weight_bytes <= options["memory_cap"]:
        return [_conv_materialised(call, x, grad_output.to(dtype), kernel, stride, dilation, names)]
    d = grad_output.to(dtype).reshape(tasks, batch, groups, layer.out_channels // groups, -1)
    d = d.transpose(3, 4)  # (T, B, G, L, C_out/G)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C_in·kh·kw, L)
    cols = cols.reshape(batch, groups, -1, cols.shape[-1]).transpose(2, 3)  # (B, G, L, C_in/G·kh·kw)
    per_group = layer.out_channels // groups
    blocks = []
    for g in range(groups):
        rows = slice(g * per_group, (g + 1) * per_group)
        key = call.key if groups == 1 else f"{call.key}[group {g}]"
        blocks.append(_dense(call, key, cols[:, g], d[:, :, g], layer.weight, layer.bias, names, options, rows))
    return blocks


def _conv_materialised(
    call: Call, x: Tensor, grad_output: Tensor, kernel, stride, dilation, names: set
) -> MaterialisedBlock:
    """Per-sample conv weight gradients without im2col: one grouped convolution of each sample's input with its
    own output gradients (samples and channels as groups). x (B, C, H, W) padded, grad_output (T, B, C_out, ...)."""
    layer = call.layer
    tasks, batch, c_out = grad_output.shape[:3]
    c_in, oh = x.shape[1], (x.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    delta = grad_output.reshape(tasks, batch, c_out, oh, -1)  # (T, B, C_out, oh, ow)
    ow = delta.shape[-1]
    parts, slots = [], []
    if "weight" in names:
        # G[b, o, c, u, v] = Σ_{y,x} δ[b, o, y, x] · x[b, c, y·s + u·dil, x·s + v·dil]: a convolution with
        # stride ↔ dilation swapped, kernel δ, one group per (sample, input channel)
        w = delta.permute(1, 0, 2, 3, 4)[:, None].expand(batch, c_in, tasks, c_out, oh, ow)
        out = F.conv2d(
            x.reshape(1, batch * c_in, *x.shape[2:]),
            w.reshape(batch * c_in * tasks * c_out, 1, oh, ow),
            stride=dilation,
            dilation=stride,
            groups=batch * c_in,
        )[..., : kernel[0], : kernel[1]]  # (1, B·C·T·O, kh, kw)
        g = out.reshape(batch, c_in, tasks, c_out, kernel[0], kernel[1]).permute(2, 0, 3, 1, 4, 5)
        parts.append(g.reshape(tasks, batch, -1))  # (T, B, C_out·C_in·kh·kw), the weight's layout
        slots.append(ParamSlot(layer.weight, layer.weight.shape))
    if "bias" in names and layer.bias is not None:
        parts.append(delta.sum((3, 4)))
        slots.append(ParamSlot(layer.bias, layer.bias.shape))
    return MaterialisedBlock(call.key, torch.cat(parts, -1) if len(parts) > 1 else parts[0], slots)


@_block_rule(nn.Embedding)
def embedding_rule(call: Call, grad_output: Tensor, names: set, options: dict) -> list[Block]:
    layer, dtype = call.layer, options["dtype"]
    idx = call.inputs[0]
    batch = idx.shape[0]
    idx = idx.reshape(batch, -1)  # (B, P)
    d = grad_output.to(dtype).reshape(grad_output.shape[0], batch, -1, layer.embedding_dim)
    if layer.padding_idx is not None:  # the padding row never receives a gradient
        d = d * (idx != layer.padding_idx)[None, :, :, None]
    slot = ParamSlot(layer.weight, layer.weight.shape)
    return [EmbeddingBlock(call.key, idx, d, slot, layer.num_embeddings)]


@_block_rule(nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def norm_affine_rule(call: Call, grad_output: Tensor, names: set, options: dict) -> list[Block]:
    """y = x̂ ⊙ γ + β: per-sample γ gradient Σ δ ⊙ x̂, β gradient Σ δ (BatchNorm: eval mode, running statistics)."""
    layer, dtype = call.layer, options["dtype"]
    x = call.inputs[0].to(dtype)
    d = grad_output.to(dtype)
    tasks, batch = d.shape[:2]
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = layer.running_mean.to(dtype).reshape(shape), layer.running_var.to(dtype).reshape(shape)
        x_hat = (x - mean) / torch.sqrt(var + layer.eps)
        gamma = (d * x_hat).reshape(tasks, batch, layer.num_features, -1).sum(-1)  # (T, B, C)
        beta = d.reshape(tasks, batch, layer.num_features, -1).sum(-1)
    elif isinstance(layer, nn.LayerNorm):
        x_hat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        n = len(layer.normalized_shape)
        gamma = (d * x_hat).reshape(tasks, batch, -1, *x.shape[-n:]).sum(2)  # (T, B, *normalized_shape)
        beta = d.reshape(tasks, batch, -1, *x.shape[-n:]).sum(2)
    else:
        x_hat = F.group_norm(x, layer.num_groups, eps=layer.eps)
        gamma = (d * x_hat).reshape(tasks, batch, layer.num_channels, -1).sum(-1)  # (T, B, C)
        beta = d.reshape(tasks, batch, layer.num_channels, -1).sum(-1)
    parts, slots = [], []
    for name, value in (("weight", gamma), ("bias", beta)):
        param = getattr(layer, name)
        if name in names and param is not None:
            parts.append(value.reshape(tasks, batch, -1))
            slots.append(ParamSlot(param, param.shape))
    return [MaterialisedBlock(call.key, torch.cat(parts, -1), slots)]
