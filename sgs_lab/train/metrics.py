"""Multitask summary metrics."""

from __future__ import annotations


def delta_m(metrics: dict[str, float], single_task: dict[str, float]) -> float:
    """Δm% = (100 / K) Σ_k (−1)^{l_k} (M_k − S_k) / S_k over the K shared metric names (Maninis et al. 2019).

    M_k is the multitask model's metric, S_k the single-task model's; l_k = 0 for metrics where higher is better
    (names ending in "accuracy") and 1 otherwise (losses, errors). Positive Δm% means better than single-task.
    """
    names = sorted(set(metrics) & set(single_task))
    if not names:
        raise ValueError("delta_m needs at least one metric present in both dicts")
    total = 0.0
    for name in names:
        sign = 1.0 if name.endswith("accuracy") else -1.0
        if single_task[name] == 0:
            raise ValueError(f"single-task metric {name!r} is 0: Δm% is undefined")
        total += sign * (metrics[name] - single_task[name]) / abs(single_task[name])
    return 100.0 * total / len(names)
