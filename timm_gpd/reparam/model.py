"""GPDModel: a dynamic teacher and the student that is a view of a slice of it."""
import copy
from contextlib import contextmanager
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.func import functional_call

from .branches import CBR_INITS, convert_to_cbr, merge_cbr
from .expansion import shared_tensor, student_view
from .widen import (
    DEFAULT_NOISE, build_wide_model, check_function_preserved, check_input, plan_expansion, uses_channels_last,
    validate_ratio,
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
      and the gradient), as in the published method. ``decouple_student=True`` (an ablation)
      divides the student's gradient by that scale squared, so that its own loss moves it at
      the optimizer's lr; the DT's gradient is unchanged.
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
            decouple_student: bool = False,
    ):
        super().__init__()
        if cbr_init not in CBR_INITS:
            raise ValueError(f'gpd_cbr_init must be one of {CBR_INITS}, got {cbr_init!r}')
        if cbr_only and not cbr:
            raise ValueError('gpd_cbr_only needs CBR: do not combine it with gpd_cbr=False')
        self.ratio = None if cbr_only else validate_ratio(ratio)
        self.cbr, self.cbr_init, self.cbr_only, self.noise, self.seed = cbr, cbr_init, cbr_only, noise, seed
        self.decouple_student = decouple_student
        self.pretrained_cfg = dict(getattr(student, 'pretrained_cfg', None) or {})
        self.student_arch = self.pretrained_cfg.get('architecture') or type(student).__name__
        self.num_classes = getattr(student, 'num_classes', None)
        self.default_mode = 'student'

        student = copy.deepcopy(student)
        reference = copy.deepcopy(student) if check and cbr and cbr_init == 'finetune' else None
        if cbr:
            convert_to_cbr(student, init=cbr_init, seed=seed)
        if cbr_only:
            self.widths: Dict[int, int] = {}
            self.teacher = None
            self.student = student
            self._shared: Dict[str, object] = {}
            if reference is not None:
                check_function_preserved(reference, student, self._check_input(reference), 'CBR student')
            return

        plan = plan_expansion(student, self.ratio)
        # the DT width of each student channel count: ``ratio`` is a target that grouped convs
        # round up to whole groups
        self.widths: Dict[int, int] = dict(sorted(plan.widths.items()))
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
            # in fp32 on float copies: half / bf16 rounding would swamp the fp32 tolerance (and the
            # check's random input is fp32)
            low_precision = any(t.is_floating_point() and t.dtype != torch.float32
                                for t in self.teacher.state_dict().values())
            checked = copy.deepcopy(self).float() if low_precision else self
            if reference is not None and low_precision:
                reference = reference.float()
            x = check_input(checked.teacher, plan.stem).float()
            check_function_preserved(_StudentOf(checked), checked.teacher, x, inputs=plan.segmented_inputs)
            if reference is not None:
                check_function_preserved(reference, _StudentOf(checked), x, 'CBR student')

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

    def _forward_both(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_tracing() or not torch.is_grad_enabled():
            return self.forward_student(x), self.teacher(x)
        # each shared DT tensor read once for both networks (expansion.shared_tensor): its one
        # gradient gets the student's added over the primary block only
        teacher_params, student_params = dict(self.teacher.named_parameters()), {}
        for name, plan in self._shared.items():
            if plan is None:
                student_params[name] = teacher_params[name]
            else:
                teacher_params[name], student_params[name] = shared_tensor(
                    teacher_params[name], plan, self.decouple_student)
        return (functional_call(self.student, student_params, (x,)),
                functional_call(self.teacher, teacher_params, (x,)))

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
            return self._forward_both(x)
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
        if self.teacher is not None and uses_channels_last(self.teacher):
            plain.to(memory_format=torch.channels_last)  # sliced views and merged kernels come out contiguous
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

    # ---- the timm model interface, answered for the student (the model that gets deployed)

    def _trained(self) -> Tuple[str, nn.Module]:
        # the module that owns the trainable tensors, and its prefix in this model's parameter names
        return ('teacher.', self.teacher) if self.teacher is not None else ('student.', self.student)

    @property
    def num_features(self) -> int:
        return self.student.num_features

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The exclusions a stock model of the student's architecture asks for, named as the
        trained tensors: the DT's tensors share the student's names below ``teacher.``."""
        names = self.student.no_weight_decay() if hasattr(self.student, 'no_weight_decay') else set()
        prefix, _ = self._trained()
        return {prefix + n for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """The student's layer groups (``--layer-decay``) applied to the trained tensors; the DT
        has the student's module structure, so the student's matcher reads its names."""
        from timm.models import group_parameters
        prefix, trained = self._trained()
        matcher = self.student.group_matcher(coarse=coarse)
        layer_of = group_parameters(trained, matcher, reverse=True)
        last = max(layer_of.values(), default=0)

        def match(name: str) -> int:
            return layer_of.get(name[len(prefix):], last) if name.startswith(prefix) else last
        return match

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Activation checkpointing of the DT's blocks (the wide network: most of the activation
        memory). The student's blocks are not checkpointed: their parameters exist only during
        the forward, so a recomputation in the backward would find none."""
        (self.teacher if self.teacher is not None else self.student).set_grad_checkpointing(enable)

    def _student_call(self, method: str, *args, **kwargs):
        if self.teacher is None:
            return getattr(self.student, method)(*args, **kwargs)
        with _plugged(self.student, self.student_parameters()):
            return getattr(self.student, method)(*args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The student's features (differentiable into the DT's tensors, like ``forward``)."""
        return self._student_call('forward_features', x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._student_call('forward_head', x, pre_logits=pre_logits)

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new classifier for ``num_classes`` classes, on the student and on the DT alike: the
        student's head is initialized by timm, the DT's is that head widened by the IR rules,
        so DT and student agree on the new head exactly as they did at construction."""
        if global_pool is None:
            self.student.reset_classifier(num_classes)
        else:
            self.student.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes
        if self.teacher is None:
            return
        from .expansion import widen_tensor
        fresh = {name: p for name, p in self.student.named_parameters()}  # only the new head has any
        missing = [name for name in fresh if name not in self._shared]
        if missing:
            raise NotImplementedError(
                f'GPDModel.reset_classifier: the DT has no widening rule for the new head tensors {missing} '
                f'(was the model built with num_classes=0?); rebuild it with num_classes={num_classes}')
        if global_pool is None:
            self.teacher.reset_classifier(num_classes)
        else:
            self.teacher.reset_classifier(num_classes, global_pool)
        with torch.no_grad():
            for name, value in fresh.items():
                plan = self._shared[name]
                path, _, attr = name.rpartition('.')
                wide = value.detach() if plan is None else widen_tensor(value.detach(), plan)
                owner = self.teacher.get_submodule(path)
                owner._parameters[attr] = nn.Parameter(wide.clone().contiguous().to(owner._parameters[attr]))
                del self.student.get_submodule(path)._parameters[attr]
        teacher_names = {name for name, _ in self.teacher.named_parameters()}
        self._shared = {name: plan for name, plan in self._shared.items() if name in teacher_names}


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
