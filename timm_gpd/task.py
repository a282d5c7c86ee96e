""" One training step of GPD, plain KD or plain training

The same step serves the method and its baselines, so a comparison between them
differs only in the losses. Per GPD step (design doc §4):

    t      = static_teacher(x)                  # optional; eval mode, no grad
    zs, zd = model(x, mode='both')              # student and dynamic teacher (DT), one graph
    L_DT   = CE(zd, y) + KD(zd, t)
    L_S    = CE(zs, y) + KD(zs, t) + DT_KD(zs, zd)
    (L_DT + L_S).backward(); clip; optimizer.step(); ema.update()

No file or console I/O here: the caller logs the returned loss parts.
"""
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

__all__ = ['TrainTask']


class TrainTask:
    """ Computes one optimization step and returns its loss parts.

    Args:
        model: the trained model, possibly wrapped by Accelerate / DDP. With
            `dynamic_teacher`, a GPD model whose `forward(x, mode='both')` returns
            (student_logits, dt_logits); otherwise any classifier.
        optimizer: the optimizer over `model`'s parameters (Accelerate-prepared or not).
        criterion: the supervised loss (CE with label smoothing), called as criterion(logits, y).
        accelerator: an `accelerate.Accelerator` for backward, clipping and autocast;
            None runs plain PyTorch (one process, fp32).
        dynamic_teacher: train the GPD student and DT jointly.
        static_teacher: a frozen model distilled into the student (and the DT);
            put in eval mode and frozen here.
        kd_loss: the static-teacher term, called as kd_loss(logits, teacher_logits, y).
        dt_loss: the DT -> student term, called as dt_loss(student_logits, dt_logits).
        clip_grad: max gradient norm; None or 0 disables clipping.
        model_ema: a timm ModelEmaV3 (or compatible `update(model, step=)`) of the unwrapped model.
    """

    def __init__(
            self,
            model: nn.Module,
            optimizer: torch.optim.Optimizer,
            criterion: Callable,
            accelerator=None,
            dynamic_teacher: bool = False,
            static_teacher: Optional[nn.Module] = None,
            kd_loss: Optional[Callable] = None,
            dt_loss: Optional[Callable] = None,
            clip_grad: Optional[float] = None,
            model_ema=None,
    ):
        if static_teacher is not None and kd_loss is None:
            raise ValueError('a static teacher needs a kd_loss')
        if dynamic_teacher and dt_loss is None:
            raise ValueError('GPD training (dynamic_teacher=True) needs a dt_loss')
        self.model = model
        self.optimizer = optimizer
        self.criterion = criterion
        self.accelerator = accelerator
        self.dynamic_teacher = dynamic_teacher
        self.static_teacher = static_teacher
        if static_teacher is not None:
            # a train-mode teacher would update its BN statistics on student batches
            static_teacher.eval().requires_grad_(False)
        self.kd_loss = kd_loss
        self.dt_loss = dt_loss
        self.clip_grad = clip_grad
        self.model_ema = model_ema
        self.num_updates = 0

    def _autocast(self):
        return self.accelerator.autocast() if self.accelerator is not None else nullcontext()

    def _unwrapped(self) -> nn.Module:
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.model)
        return self.model

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """ Forward pass and losses; 'loss' is the total to back-propagate. """
        with self._autocast():
            teacher_logits = None
            if self.static_teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.static_teacher(x)
            if self.dynamic_teacher:
                # through __call__ with a mode, never .module.forward_both: DDP only
                # synchronizes gradients of a forward that went through its wrapper
                student_logits, dt_logits = self.model(x, mode='both')
            else:
                student_logits, dt_logits = self.model(x), None

        parts = {'student_ce': self.criterion(student_logits, y)}
        if teacher_logits is not None:
            parts['student_kd'] = self.kd_loss(student_logits, teacher_logits, y)
        if dt_logits is not None:
            parts['student_dt'] = self.dt_loss(student_logits, dt_logits)
            parts['dt_ce'] = self.criterion(dt_logits, y)
            if teacher_logits is not None:
                parts['dt_kd'] = self.kd_loss(dt_logits, teacher_logits, y)
        parts['loss'] = sum(parts.values())
        return parts

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """ One optimizer step on batch (x, y); returns the detached loss parts. """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = self.losses(x, y)
        if self.accelerator is not None:
            self.accelerator.backward(parts['loss'])
        else:
            parts['loss'].backward()

        if self.clip_grad:
            params = self.model.parameters()
            if self.accelerator is not None:
                grad_norm = self.accelerator.clip_grad_norm_(params, self.clip_grad)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            parts['grad_norm'] = grad_norm
        self.optimizer.step()
        self.num_updates += 1

        if self.model_ema is not None:
            self.model_ema.update(self._unwrapped(), step=self.num_updates)
        return {k: v.detach() for k, v in parts.items()}
