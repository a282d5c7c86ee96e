""" Distillation losses for GPD training

All losses take logits shaped (batch, classes) and return the mean over the batch.
Teacher logits are detached inside the losses: a teacher never learns from the
loss it teaches with (the dynamic teacher learns from its own loss instead).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['SoftTargetKD', 'DecoupledKD', 'DynamicTeacherKD', 'kd_loss_from_name']


def _kl_from_log_probs(log_p_target: torch.Tensor, log_p_input: torch.Tensor) -> torch.Tensor:
    # KL(target || input) per sample; both given as log-probabilities so no 0 * log 0 arises
    return (log_p_target.exp() * (log_p_target - log_p_input)).sum(dim=-1)


class SoftTargetKD(nn.Module):
    """ Vanilla knowledge distillation (Hinton et al., 2015).

    KL(softmax(t / T) || softmax(s / T)) * T^2: the T^2 keeps gradient magnitudes
    independent of the temperature.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
        return _kl_from_log_probs(log_p_teacher, log_p_student).mean() * t * t

    def extra_repr(self) -> str:
        return f'temperature={self.temperature}'


class DecoupledKD(nn.Module):
    """ Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022).

    Splits KD into a target-class part (TCKD: KL between the binary
    distributions [p_target, 1 - p_target]) and a non-target part (NCKD: KL
    between the distributions over the non-target classes, renormalized), and
    weights them independently: alpha * TCKD + beta * NCKD, each scaled by T^2.

    Soft targets (Mixup / CutMix, shape (batch, classes)): DKD needs one target class per
    sample, and takes the dominant one, the argmax of the mixed target (the label with the
    larger mixing weight; label smoothing does not move it; on an exact tie, the lower class
    index). The teacher still sees the mixed image: its distribution over the other label is
    part of what NCKD transfers.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def parts(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor):
        """ Return (TCKD, NCKD), batch means, unweighted, T^2 scaled. """
        if target.ndim == 2:
            target = target.argmax(dim=-1)  # soft (mixed) targets: the dominant class
        elif target.ndim != 1:
            raise ValueError(f'DecoupledKD takes class indices (batch,) or soft targets (batch, classes), '
                             f'got a target of shape {tuple(target.shape)}')
        t = self.temperature
        s = student_logits.float() / t
        z = teacher_logits.detach().float() / t
        batch, num_classes = s.shape
        is_target = F.one_hot(target, num_classes).bool()

        def binary_and_rest(logits):
            log_p = F.log_softmax(logits, dim=-1)
            log_p_target = log_p[is_target]
            # the non-target classes of each row, gathered so no masking value leaks into softmax
            rest = logits[~is_target].view(batch, num_classes - 1)
            log_p_rest_mass = torch.logsumexp(log_p[~is_target].view(batch, num_classes - 1), dim=-1)
            binary = torch.stack([log_p_target, log_p_rest_mass], dim=-1)
            return binary, F.log_softmax(rest, dim=-1)

        s_binary, s_rest = binary_and_rest(s)
        z_binary, z_rest = binary_and_rest(z)
        tckd = _kl_from_log_probs(z_binary, s_binary).mean() * t * t
        nckd = _kl_from_log_probs(z_rest, s_rest).mean() * t * t
        return tckd, nckd

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor):
        tckd, nckd = self.parts(student_logits, teacher_logits, target)
        return self.alpha * tckd + self.beta * nckd

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}'


class DynamicTeacherKD(nn.Module):
    """ The GPD term that lets the dynamic teacher (DT) teach the student.

    weight * KL(softmax(zd / T).detach() || softmax(zs / T)) * T^2. The DT side is
    detached: this term moves the student towards the DT, never the DT towards the
    student (the shared weights still receive it through the student's view).
    """

    def __init__(self, weight: float = 3.0, temperature: float = 1.0):
        super().__init__()
        self.weight = weight
        self.kd = SoftTargetKD(temperature)

    def forward(self, student_logits: torch.Tensor, dt_logits: torch.Tensor) -> torch.Tensor:
        return self.weight * self.kd(student_logits, dt_logits.detach())

    def extra_repr(self) -> str:
        return f'weight={self.weight}'


class _WeightedKD(nn.Module):
    # gives vanilla KD the same (student, teacher, target) call as DKD
    def __init__(self, weight: float, temperature: float):
        super().__init__()
        self.weight = weight
        self.kd = SoftTargetKD(temperature)

    def forward(self, student_logits, teacher_logits, target=None):
        return self.weight * self.kd(student_logits, teacher_logits)

    def extra_repr(self) -> str:
        return f'weight={self.weight}'


def kd_loss_from_name(name: str, alpha: float = 1.0, beta: float = 0.5, temperature: float = 1.0) -> nn.Module:
    """ Build the static-teacher KD term, called as loss(student_logits, teacher_logits, target).

    'kd': alpha * SoftTargetKD(T); 'dkd': DecoupledKD(alpha, beta, T).
    """
    if name == 'kd':
        return _WeightedKD(alpha, temperature)
    if name == 'dkd':
        return DecoupledKD(alpha=alpha, beta=beta, temperature=temperature)
    raise ValueError(f"unknown KD loss {name!r}; expected 'kd' or 'dkd'")
