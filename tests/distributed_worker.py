"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU, float64).

Every rank holds a shard of one global batch; the statistics, the SGS weights and one SGD update computed with
``process_group`` must equal those of a single process holding the whole batch. Each rank writes its worst error
per quantity to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sgs_lab import SampleGradients
from sgs_lab.distributed import all_reduce_gradients, init, shard
from sgs_lab.weighting import make_method

FIELDS = ("cosine", "dot", "norm", "ref_norm", "conflict")
GLOBAL = ("task_cosine", "gramian")


def model(seed: int):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 12), nn.Tanh(),
                            nn.Linear(12, 10), nn.Tanh()).double()  # fmt: skip
    heads = nn.ModuleList([nn.Linear(10, 4), nn.Linear(10, 3)]).double()
    return encoder, heads


def step(encoder, heads, x, ys, masks, reference, knobs, group, context):
    probe = SampleGradients(encoder, process_group=group)
    with probe.capture():
        z = encoder(x)
    losses = {f"t{k}": F.cross_entropy(h(z), y, reduction="none") for k, (h, y) in enumerate(zip(heads, ys))}
    labels = dict(zip(losses, ys))
    stats = probe.compute(losses, labels=labels, reference=reference, masks=dict(zip(losses, masks)))
    weights, task_weights = make_method("sgs", **knobs).weights(stats, epoch=10)
    stats.backward(weights, task_weights)
    params = [*encoder.parameters(), *heads.parameters()]
    if group is not None:
        all_reduce_gradients(params, group)
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad  # a large SGD step: any error in the gradient shows in the parameters
    return stats, weights, task_weights, params


def main(out: Path) -> int:
    context = init("cpu")
    torch.manual_seed(0)
    batch = 23  # odd: the ranks hold 12 and 11 samples
    x = torch.randn(batch, 1, 4, 4, dtype=torch.float64)
    ys = [torch.randint(0, 4, (batch,)), torch.randint(0, 3, (batch,))]
    masks = [torch.rand(batch) > 0.2, torch.ones(batch, dtype=torch.bool)]
    mine = shard(torch.arange(batch), context)
    worst: dict[str, float] = {}
    for reference in ("batch", "loo", "class"):
        for knobs in ({"sample_rule": "affine", "alpha": 2.0, "clamp": (0.2, 3.0)},
                      {"sample_rule": "softmax", "task_rule": "coherence", "reference": reference},
                      {"sample_rule": "relu", "task_rule": "consistency"}):  # fmt: skip
            knobs = {**knobs, "reference": reference, "warmup": 0}
            whole = step(*model(1), x, ys, masks, reference, knobs, None, None)
            split = step(*model(1), x[mine], [y[mine] for y in ys], [m[mine] for m in masks], reference, knobs,
                         context.group, context)  # fmt: skip
            for name in FIELDS:
                expected = getattr(whole[0], name)[..., mine] if name != "conflict" else whole[0].conflict[mine]
                got = getattr(split[0], name)
                both = torch.isfinite(expected)
                assert torch.equal(both, torch.isfinite(got)), name
                worst[name] = max(worst.get(name, 0.0), float((expected[both] - got[both]).abs().max()))
            for name in GLOBAL:
                gap = float((getattr(whole[0], name) - getattr(split[0], name)).abs().max())
                worst[name] = max(worst.get(name, 0.0), gap)
            kept = whole[0].mask[:, mine]
            worst["weights"] = max(worst.get("weights", 0.0), float((whole[1][:, mine] - split[1])[kept].abs().max()))
            worst["task_weights"] = max(worst.get("task_weights", 0.0), float((whole[2] - split[2]).abs().max()))
            gap = max(float((a - b).detach().abs().max()) for a, b in zip(whole[3], split[3]))
            worst["parameters"] = max(worst.get("parameters", 0.0), gap)
    # a similarity against other labels must not leak into the stats' own class reference afterwards
    whole = step(*model(1), x, ys, masks, "batch", {"warmup": 0}, None, None)[0]
    split = step(*model(1), x[mine], [y[mine] for y in ys], [m[mine] for m in masks], "batch", {"warmup": 0},
                 context.group, context)[0]  # fmt: skip
    other = {task: (y + 1) % (4 - k) for k, (task, y) in enumerate(zip(split.tasks, ys))}
    split.similarity("class", labels={t: y[mine] for t, y in other.items()})
    got, expected = split.similarity("class").cosine, whole.similarity("class").cosine[:, mine]
    worst["class_after_other_labels"] = float((got - expected).nan_to_num(0).abs().max())
    # the check has teeth: the same shard without the process group (local references) gives other statistics
    local = step(*model(1), x[mine], [y[mine] for y in ys], [m[mine] for m in masks], "batch", {"warmup": 0},
                 None, None)  # fmt: skip
    whole = step(*model(1), x, ys, masks, "batch", {"warmup": 0}, None, None)
    worst["local_only_cosine"] = float((whole[0].cosine[:, mine] - local[0].cosine).nan_to_num(0).abs().max())
    (out / f"rank{context.rank}.json").write_text(json.dumps(worst))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
