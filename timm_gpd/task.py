""" One training step of GPD, plain KD or plain training

The same step serves the method and its baselines, so a comparison between them
differs only in the losses. Per GPD step (design doc §4):

    t      = static_teacher(x)                  # optional; eval mode, no grad
    zs, zd = model(x, mode='both')              # student and dynamic teacher (DT), one graph
    L_DT   = CE(zd, y) + KD(zd, t)
    L_S    = CE(zs, y) + KD(zs, t) + DT_KD(zs, zd)
    (L_DT + L_S).backward(); clip; optimizer.step(); ema.update()

Under Mixup / CutMix (timm's ``Mixup``, applied here to every training batch) the targets are
soft: ``criterion`` must take them (timm's SoftTargetCrossEntropy; the label smoothing is in the
mixed targets). The static teacher and the DT see the mixed images. Vanilla KD and the DT ->
student term compare logits only, so mixing changes nothing in them; DKD splits its loss at one
target class, and takes the dominant class of each mixed target (its argmax; see
``timm_gpd.losses.DecoupledKD``).

No file or console I/O here: the caller logs the returned loss parts.
"""
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['RenormalizedTeacher', 'TrainTask']


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
        mixup_fn: a timm ``Mixup`` applied to every training batch (then ``criterion`` takes soft targets).
        mixup_off_epoch: from this epoch on (``set_epoch``) mixup is disabled, as timm's --mixup-off-epoch:
            ``Mixup`` still turns labels into smoothed one-hot targets. 0: never.
        grad_accum_steps: batches per optimizer update, with timm's semantics: the loss of each batch is
            divided by the number of batches of its update, a last shorter group of an epoch updates
            with its own count. Needs an ``accelerator`` built with the same gradient_accumulation_steps
            (Accelerate skips gradient synchronization between updates).
        channels_last: feed the model channels_last inputs.
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
            mixup_fn: Optional[Callable] = None,
            mixup_off_epoch: int = 0,
            grad_accum_steps: int = 1,
            channels_last: bool = False,
    ):
        if static_teacher is not None and kd_loss is None:
            raise ValueError('a static teacher needs a kd_loss')
        if dynamic_teacher and dt_loss is None:
            raise ValueError('GPD training (dynamic_teacher=True) needs a dt_loss')
        if grad_accum_steps > 1 and (accelerator is None or accelerator.gradient_accumulation_steps != grad_accum_steps):
            raise ValueError(f'grad_accum_steps={grad_accum_steps} needs an Accelerator built with '
                             f'gradient_accumulation_steps={grad_accum_steps}')
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
        self.mixup_fn = mixup_fn
        self.mixup_off_epoch = mixup_off_epoch
        self.grad_accum_steps = grad_accum_steps
        self.channels_last = channels_last
        self.num_updates = 0

    def set_epoch(self, epoch: int):
        """ Call before each epoch: applies ``mixup_off_epoch``. """
        if self.mixup_fn is not None and self.mixup_off_epoch and epoch >= self.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False

    def _autocast(self):
        return self.accelerator.autocast() if self.accelerator is not None else nullcontext()

    def _unwrapped(self) -> nn.Module:
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return self.model

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """ Forward pass and losses; 'loss' is the total to back-propagate. """
        return self.loss_parts(*self.logits(x), y)

    def logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """ (student, DT, static teacher) logits of one forward; None for a network not trained with. """
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
        return student_logits, dt_logits, teacher_logits

    def loss_parts(self, student_logits: torch.Tensor, dt_logits: Optional[torch.Tensor],
                   teacher_logits: Optional[torch.Tensor], y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """ The named losses of ``logits``' output; 'loss' is their sum. """
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

    def step(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int = 0, num_batches: int = 1
             ) -> Dict[str, torch.Tensor]:
        """ Forward and backward of batch (x, y) of an epoch of ``num_batches``; an optimizer step when
        its gradient-accumulation group is complete (every batch without accumulation). Returns the
        detached loss parts (the batch's own, not divided for accumulation) and, on an update with
        clipping, 'grad_norm'. """
        self.model.train()
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.grad_accum_steps == 1:
            self._zero_grad()
            parts = self.losses(x, y)
            self._backward(parts['loss'])
            self._update(parts)
            return {k: v.detach() for k, v in parts.items()}

        accum = self.grad_accum_steps
        # timm: a last group shorter than accum (num_batches % accum batches) is one update of its own
        tail = num_batches % accum
        group = tail if tail and batch_idx >= num_batches - tail else accum
        need_update = (batch_idx + 1) % accum == 0 or batch_idx == num_batches - 1
        if batch_idx % accum == 0:
            self._zero_grad()
        with self.accelerator.accumulate(self.model):
            if self.accelerator.sync_gradients != need_update:
                raise RuntimeError(
                    f'gradient accumulation out of step at batch {batch_idx} of {num_batches}: Accelerate '
                    f'{"updates" if self.accelerator.sync_gradients else "accumulates"}, timm would not '
                    '(was the loader prepared by this Accelerator?)')
            parts = self.losses(x, y)
            # Accelerate divides every loss by accum; timm divides by the size of the batch's group
            self._backward(parts['loss'] * (accum / group))
            if need_update:
                self._update(parts)
        return {k: v.detach() for k, v in parts.items()}

    def _zero_grad(self):
        # by hand: Accelerate's optimizer ignores zero_grad() inside an accumulation group, where
        # the first batch of a group is
        for group in self.optimizer.param_groups:
            for p in group['params']:
                p.grad = None

    def _backward(self, loss: torch.Tensor):
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _update(self, parts: Dict[str, torch.Tensor]):
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


class RenormalizedTeacher(nn.Module):
    """ A frozen static teacher fed the student's batches, normalized the teacher's way.

    Built on timm's ``DistillationTeacher``: the student's input ``x`` (normalized with the
    student's mean/std) becomes ``(x * std_s + mean_s - mean_t) / std_t``, the teacher's own
    normalization; identical statistics leave ``x`` untouched. Statistics with fewer channels than
    given (grayscale input, RGB statistics) are averaged over channels, as train.py does for the
    student.

    Args:
        teacher: the teacher model (eval mode, no gradients from here on).
        student_mean, student_std: the normalization of the batches the student is trained on.
        teacher_mean, teacher_std: the teacher's; default: its ``pretrained_cfg`` (timm's rule).
    """

    def __init__(self, teacher: nn.Module, student_mean, student_std, teacher_mean=None, teacher_std=None):
        super().__init__()
        from timm.task import DistillationTeacher
        self.teacher = DistillationTeacher(teacher)
        self.teacher.requires_grad_(False)
        in_chans = len(student_mean)
        cfg = getattr(teacher, 'pretrained_cfg', None) or {}
        teacher_mean = teacher_mean if teacher_mean is not None else cfg.get('mean', student_mean)
        teacher_std = teacher_std if teacher_std is not None else cfg.get('std', student_std)

        def stats(values):
            values = [float(v) for v in values]
            if len(values) != in_chans:
                values = [sum(values) / len(values)] * in_chans
            return torch.tensor(values).view(1, -1, 1, 1)
        self.teacher.mean_kd, self.teacher.std_kd = stats(teacher_mean), stats(teacher_std)
        self.register_buffer('student_mean', stats(student_mean), persistent=False)
        self.register_buffer('student_std', stats(student_std), persistent=False)

    @property
    def renormalizes(self) -> bool:
        return not (torch.equal(self.student_mean, self.teacher.mean_kd)
                    and torch.equal(self.student_std, self.teacher.std_kd))

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher's BatchNorm must never follow the student's batches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.teacher.normalize_input(x, self.student_mean, self.student_std))
