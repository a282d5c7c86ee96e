"""GPDModel: a dynamic teacher and the student that is a view of a slice of it."""
import copy
from contextlib import contextmanager
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.func import functional_call

from .branches import CBR_INITS, convert_to_cbr, merge_cbr
from .expansion import student_view
from .widen import (
    DEFAULT_NOISE, build_wide_model, check_function_preserved, check_input, plan_expansion, validate_ratio,
)

MODES = ('student', 'teacher', 'both')


class GPDModel(nn.Module):
    """Gap Preserving Distillation wrapper around a timm (or any supported) student.

    * ``teacher`` is the dynamic teacher (DT): a plain, ``ratio`` times wider copy of the
      student (after CBR), computing exactly the student's function at construction.
    * ``student`` holds the student's structure and its **own buffers** (BatchNorm running
      statistics) but no parameters: on every forward its parameters are computed from the
      DT's (slice x copy count), so the student is a view of the DT and gradients of a
      student loss reach the DT's primary slice. ``parameters()`` therefore lists each
      trainable tensor once. With SGD, the student's dense weights move with ``ratio**2``
      times the learning rate of a standalone student (slice x scale on both the forward
      and the gradient), as in the published method.
    * ``cbr_only=True`` keeps no DT: the student is trained with CBR branches alone (ablation).

    ``forward(x)`` returns student logits (what gets deployed); ``forward(x, mode='both')``
    returns ``(student, teacher)`` logits from one call, which is what DDP needs.
    """

    def __init__(
            self,
            student: nn.Module,
            ratio: float = 2.0,
            cbr: bool = True,
            cbr_init: str = 'scratch',
            cbr_only: bool = False,
            noise: float = DEFAULT_NOISE,
            seed: int = 0,
            check: bool = True,
    ):
        super().__init__()
        if cbr_init not in CBR_INITS:
            raise ValueError(f'gpd_cbr_init must be one of {CBR_INITS}, got {cbr_init!r}')
        if cbr_only and not cbr:
            raise ValueError('gpd_cbr_only needs CBR: do not combine it with gpd_cbr=False')
        self.ratio = None if cbr_only else validate_ratio(ratio)
        self.cbr, self.cbr_init, self.cbr_only, self.noise, self.seed = cbr, cbr_init, cbr_only, noise, seed
        self.pretrained_cfg = dict(getattr(student, 'pretrained_cfg', None) or {})
        self.student_arch = self.pretrained_cfg.get('architecture') or type(student).__name__
        self.num_classes = getattr(student, 'num_classes', None)
        self.default_mode = 'student'

        student = copy.deepcopy(student)
        reference = copy.deepcopy(student) if check and cbr and cbr_init == 'finetune' else None
        if cbr:
            convert_to_cbr(student, init=cbr_init, seed=seed)
        if cbr_only:
            self.teacher = None
            self.student = student
            self._shared: Dict[str, object] = {}
            if reference is not None:
                check_function_preserved(reference, student, self._check_input(reference), 'CBR student')
            return

        plan = plan_expansion(student, self.ratio)
        self.teacher = build_wide_model(student, plan, noise=noise, seed=seed)
        # the student keeps only the description of how to read its weights from the DT
        self._shared = {
            name: plan.tensors.get(name) for name, _ in student.named_parameters()}
        for module in student.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:  # None entries (bias=False) stay: forwards read them
                    del module._parameters[name]
        self.student = student
        if check:
            x = check_input(self.teacher, plan.stem)
            check_function_preserved(_StudentOf(self), self.teacher, x)
            if reference is not None:
                check_function_preserved(reference, _StudentOf(self), x, 'CBR student')

    def _check_input(self, model: nn.Module) -> torch.Tensor:
        from .widen import find_stem_and_classifier
        return check_input(model, find_stem_and_classifier(model)[0])

    @property
    def has_teacher(self) -> bool:
        return self.teacher is not None

    def student_parameters(self) -> Dict[str, torch.Tensor]:
        """The student's parameters, computed from the DT's (differentiable)."""
        if self.teacher is None:
            return dict(self.student.named_parameters())
        params = dict(self.teacher.named_parameters())
        return {
            name: params[name] if plan is None else student_view(params[name], plan)
            for name, plan in self._shared.items()}

    def forward_student(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return self.student(x)
        if torch.jit.is_tracing():
            # functional_call refuses to run under torch.jit.trace; do by hand what it does
            with _plugged(self.student, self.student_parameters()):
                return self.student(x)
        return functional_call(self.student, self.student_parameters(), (x,))

    def forward_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, mode='teacher')

    def forward_both(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(student logits, teacher logits); calls ``self(x, mode='both')`` so DDP hooks run."""
        return self(x, mode='both')

    def forward(self, x: torch.Tensor, mode: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        mode = mode or self.default_mode
        if mode in ('teacher', 'both') and self.teacher is None:
            raise ValueError(f"mode {mode!r} needs the dynamic teacher, but this GPDModel was built with cbr_only=True")
        if mode == 'student':
            return self.forward_student(x)
        if mode == 'teacher':
            return self.teacher(x)
        if mode == 'both':
            return self.forward_student(x), self.teacher(x)
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')

    @torch.no_grad()
    def extract_student(self) -> nn.Module:
        """The student as a stock model of its original class: CBR branches merged into plain
        convs, its own BatchNorm statistics, eval mode. Needs nothing from timm_gpd to run."""
        plain = copy.deepcopy(self.student)
        for name, value in self.student_parameters().items():
            path, _, attr = name.rpartition('.')
            module = plain.get_submodule(path)
            module._parameters[attr] = nn.Parameter(value.detach().clone())
        merge_cbr(plain)
        plain.pretrained_cfg = dict(getattr(self.student, 'pretrained_cfg', None) or {})
        return plain.eval()

    def get_classifier(self) -> nn.Module:
        return self.student.get_classifier()

    def extra_repr(self) -> str:
        return (f'student={self.student_arch}, ratio={self.ratio}, cbr={self.cbr}, '
                f'cbr_init={self.cbr_init!r}, cbr_only={self.cbr_only}')

    def __repr__(self) -> str:
        if self.teacher is None:
            return super().__repr__()
        # layers' extra_repr read their parameters (nn.Linear: `self.bias is not None`), which the
        # student only has during a forward: plug the views in while printing
        with torch.no_grad(), _plugged(self.student, self.student_parameters()):
            return super().__repr__()


@contextmanager
def _plugged(student: nn.Module, params: Dict[str, torch.Tensor]):
    """Put ``params`` (computed views) into the student's emptied parameter slots for one call.
    Being plain tensors of the graph, they trace as operations on the DT's parameters."""
    slots = []
    try:
        for name, value in params.items():
            path, _, attr = name.rpartition('.')
            module = student.get_submodule(path)
            module._parameters[attr] = value
            slots.append((module, attr))
        yield
    finally:
        for module, attr in slots:
            del module._parameters[attr]


class _StudentOf(nn.Module):
    """Calls a GPDModel's student path, for the construction checks."""

    def __init__(self, gpd: GPDModel):
        super().__init__()
        self.__dict__['gpd'] = gpd  # not a submodule: the check must not register it twice

    def forward(self, x):
        return self.gpd.forward_student(x)

    def named_modules(self, *args, **kwargs):
        return self.gpd.student.named_modules(*args, **kwargs)

    def train(self, mode: bool = True):
        self.gpd.student.train(mode)
        return self
