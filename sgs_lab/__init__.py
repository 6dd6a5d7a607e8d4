"""sgs_lab: per-sample gradient similarity (SGS) for multitask learning — compute, cache, visualise.

>>> import torch, torch.nn as nn, torch.nn.functional as F
>>> import sgs_lab
>>> encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
>>> head_a, head_b = nn.Linear(16, 3), nn.Linear(16, 1)
>>> x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
>>> probe = sgs_lab.SampleGradients(encoder)
>>> with probe.capture():
...     z = encoder(x)
>>> losses = {"cls": F.cross_entropy(head_a(z), y, reduction="none"),
...           "reg": (head_b(z).squeeze(1) - 1.0) ** 2}
>>> stats = probe.compute(losses, reference="batch")
>>> stats.cosine.shape, stats.task_cosine.shape, stats.conflict.shape
(torch.Size([2, 6]), torch.Size([2, 2]), torch.Size([6, 2, 2]))
"""

from .grads import EMAReference, GradStats, SampleGradients, SGSFallbackWarning, register_grad_rule

__version__ = "0.1.0"

__all__ = ["EMAReference", "GradStats", "SGSFallbackWarning", "SampleGradients", "__version__", "register_grad_rule"]
