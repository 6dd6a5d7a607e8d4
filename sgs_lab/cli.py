"""The ``sgs-lab`` command."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _check(args: argparse.Namespace) -> int:
    """Compare the engine with the per-sample loop oracle on a small model, on the chosen device."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from .grads import SampleGradients
    from .testing import compare_stats, oracle_stats

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 3), nn.Linear(16, 3)])
    encoder, heads = encoder.double().to(device), heads.double().to(device)
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64, device=device)
    ys = [torch.randint(0, 3, (12,), device=device) for _ in heads]
    worst = 0.0
    for backend in ("auto", "batched"):
        probe = SampleGradients(encoder, backend=backend)
        for reference in ("batch", "loo", "class"):
            with probe.capture():
                z = encoder(x)
            losses = {f"task{t}": F.cross_entropy(h(z), y, reduction="none") for t, (h, y) in enumerate(zip(heads, ys))}
            labels = dict(zip(losses, ys))
            stats = probe.compute(losses, labels=labels, reference=reference)
            errors = compare_stats(stats, oracle_stats(losses, list(encoder.parameters()), labels, reference))
            worst = max(worst, *errors.values())
            print(f"{backend:8s} {reference:6s} max error {max(errors.values()):.2e}")
    print(f"engine agrees with the loop oracle on {device} (float64): max error {worst:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sgs-lab", description="Per-sample gradient similarity for multitask learning."
    )
    parser.add_argument("--version", action="version", version=f"sgs_lab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="check the engine against the per-sample loop oracle on this machine")
    check.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
