"""Forward hooks that record what the rules need, as a removable context manager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .rules import Call


def output_tensors(value) -> list[Tensor]:
    """Tensors (requiring grad) inside a module's output: a tensor, or a tuple/list/dict of them."""
    if isinstance(value, Tensor):
        return [value] if value.requires_grad else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    return []


class Recording:
    """What one capture saw: each hooked layer's calls (in order) and the module's outputs."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Call]] = {}
        self.outputs: list[Tensor] = []
        self.versions: list[tuple[str, Tensor, int]] = []

    def check_unchanged(self) -> None:
        for what, tensor, version in self.versions:
            if tensor._version != version:
                raise RuntimeError(
                    f"{what} was modified in place after the forward (for instance by ReLU(inplace=True)); "
                    "per-sample statistics need it intact: use the out-of-place version of that operation"
                )


@contextmanager
def record(module: nn.Module, layers: dict[str, nn.Module]) -> Iterator[Recording]:
    """Hook ``layers`` (name → submodule) and ``module`` itself; yield the Recording they fill."""
    rec = Recording()

    def layer_hook(name: str):
        def hook(layer: nn.Module, inputs: tuple, output) -> None:
            if not isinstance(output, Tensor) or not output.requires_grad:
                return  # nothing flows back through this call (e.g. under torch.no_grad)
            detached = tuple(i.detach() if isinstance(i, Tensor) else i for i in inputs)
            rec.calls.setdefault(name, []).append(Call(name, layer, detached, output))
            rec.versions.append((f"the output of layer {name!r}", output, output._version))
            if detached and isinstance(detached[0], Tensor):
                rec.versions.append((f"the input of layer {name!r}", detached[0], detached[0]._version))

        return hook

    def module_hook(_module: nn.Module, _inputs: tuple, output) -> None:
        rec.outputs.extend(output_tensors(output))

    handles = [layer.register_forward_hook(layer_hook(name)) for name, layer in layers.items()]
    handles.append(module.register_forward_hook(module_hook))
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
