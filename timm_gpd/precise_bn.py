"""Precise BatchNorm: recompute running statistics as a plain average over fixed batches.

BatchNorm's running statistics are an exponential average (momentum 0.1) of batch statistics
taken while the weights move. Early in training, or with a high effective learning rate (a GPD
student's dense weights move with ratio**2 times the learning rate), they describe weights from
many steps ago and an eval-mode model scores far below its train-mode self. Recomputing them for
the current weights before evaluating fixes that without touching training: a training-mode
forward normalizes with batch statistics and never reads the running ones.
"""
from typing import Callable, Iterable, List

import torch
import torch.nn as nn


def running_stat_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (incl. timm's BatchNormAct2d) that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], object]) -> int:
    """Replace the running statistics of every BatchNorm in ``model`` by the average of the batch
    statistics that ``forward(x)`` produces over ``batches``; returns the number of batches used.

    Only the BatchNorm layers run in training mode (dropout and drop-path stay off and draw no
    random numbers; a loader behind ``batches`` may still draw some, which is the caller's to
    isolate). Every module's mode, momentum and batch counter are restored afterwards.
    """
    norms = running_stat_norms(model)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone())
             for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen since the reset
        m.train()
    count, completed = 0, False
    try:
        for x in batches:
            forward(x)
            count += 1
        completed = True
    finally:
        for m, (momentum, tracked, mean, var) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
            if not completed or count == 0:  # a failure or no batch at all: keep the old statistics
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, mode in modes.items():
            m.training = mode
    return count
