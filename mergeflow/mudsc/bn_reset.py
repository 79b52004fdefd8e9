"""Re-estimate BatchNorm running statistics with one pass over training images.

A merged (or re-based) model's running mean/var no longer describe its activations; this is
a plain recomputation (cumulative average, momentum None), not REPAIR. Only running statistics
change; weights, biases and the module's train/eval mode are left as they were.
"""

from __future__ import annotations

import torch
from torch import nn

# BatchNorm1d too: the official reset_bn_stats takes BatchNorm2d only, as its models (CNNs) have
# no other; a merged BatchNorm1d's statistics are just as stale.
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running mean/var on `images`, in place; returns `model`."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return model
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the whole pass
    model.train()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return model
