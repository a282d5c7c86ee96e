"""Channel-Branch Reparameterization (CBR): a k x k conv trained as several linear branches.

Every branch is linear in its weights, so the sum of branches is one k x k kernel: training
sees the richer parameterization, extraction writes the merged kernel into a plain ``nn.Conv2d``.

Branches, each with a learnable per-output-channel scale (``scales[b]``):

0. ``origin``  : the k x k kernel itself.
1. ``avg``     : 1x1 conv then k x k average (outer product with a constant kernel).
2. ``prior``   : 1x1 conv times a fixed 2-D DCT basis element (a frequency prior).
3. ``mix_kxk`` : 1x1 conv C_in -> C_in (identity + learnable) then a k x k conv.
4. ``dw_pw``   : depthwise k x k conv then 1x1 pointwise conv.

Each branch can run in two ways that compute the same function: merged into the one kernel
(passes over kernel-sized tensors, plus for mix_kxk a C_out x C_in x C_in product, whatever
the batch) or on the activations (its own convs, whose cost grows with batch x positions).
Per forward and per branch the cheaper is used (:func:`cbr_step_costs`, :func:`choose_plan`):
large feature maps merge everything, small ones (late stages at 32-64 px) run every branch on
the activations.
"""
import math
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BRANCHES = ('origin', 'avg', 'prior', 'mix_kxk', 'dw_pw')
# From scratch every branch contributes; the small dw_pw scale keeps the early kernel
# dominated by the dense branches. Prior starts silent: its scale learns to open it.
SCRATCH_SCALES = (0.25, 0.25, 0.0, 0.5, 0.05)
# Fine-tuning starts from a pretrained kernel: only the origin branch is on, so the
# converted conv computes exactly the pretrained function.
FINETUNE_SCALES = (1.0, 0.0, 0.0, 0.0, 0.0)
CBR_INITS = ('scratch', 'finetune')


def _dct_basis(kh: int, kw: int, u: int = 1, v: int = 1) -> torch.Tensor:
    ys = torch.cos(math.pi * (torch.arange(kh) + 0.5) * u / kh) if kh > 1 else torch.ones(1)
    xs = torch.cos(math.pi * (torch.arange(kw) + 0.5) * v / kw) if kw > 1 else torch.ones(1)
    return torch.outer(ys, xs)


def _group_identity(channels: int, groups: int) -> torch.Tensor:
    """Weight [C, C/groups] of a grouped 1x1 conv computing the identity."""
    per_group = channels // groups
    eye = torch.zeros(channels, per_group)
    eye[torch.arange(channels), torch.arange(channels) % per_group] = 1.0
    return eye


class CBRConv2d(nn.Module):
    """A k x k conv whose kernel is the scaled sum of the five branches above."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Tuple[int, int],
            stride: Tuple[int, int] = (1, 1),
            padding=(0, 0),
            dilation: Tuple[int, int] = (1, 1),
            groups: int = 1,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        kh, kw = self.kernel_size
        in_per_group = in_channels // groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_per_group, kh, kw, **dd))
        self.w_avg = nn.Parameter(torch.empty(out_channels, in_per_group, **dd))
        self.w_prior = nn.Parameter(torch.empty(out_channels, in_per_group, **dd))
        self.mixer = nn.Parameter(torch.zeros(in_channels, in_per_group, **dd))
        self.w_kxk = nn.Parameter(torch.empty(out_channels, in_per_group, kh, kw, **dd))
        self.w_dw = nn.Parameter(torch.empty(in_channels, kh, kw, **dd))
        self.w_pw = nn.Parameter(torch.empty(out_channels, in_per_group, **dd))
        self.scales = nn.Parameter(torch.empty(len(BRANCHES), out_channels, **dd))
        self.bias = nn.Parameter(torch.zeros(out_channels, **dd)) if bias else None
        self.register_buffer('mixer_identity', _group_identity(in_channels, groups).to(**dd))
        self.register_buffer('avg_kernel', torch.full((kh, kw), 1.0 / (kh * kw), **dd))
        self.register_buffer('prior_kernel', _dct_basis(kh, kw).to(**dd))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = 'scratch', generator: Optional[torch.Generator] = None):
        if init not in CBR_INITS:
            raise ValueError(f'Unknown CBR init {init!r}: expected one of {CBR_INITS}')
        w = conv.weight
        m = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=conv.bias is not None, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            m.weight.copy_(w)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
            m.init_branches(generator)
            scales = FINETUNE_SCALES if init == 'finetune' else SCRATCH_SCALES
            m.scales.copy_(torch.tensor(scales, dtype=w.dtype).unsqueeze(1).expand_as(m.scales))
        m.train(conv.training)
        return m

    @torch.no_grad()
    def init_branches(self, generator: Optional[torch.Generator] = None):
        """He-normal init of the non-origin branches (fan-in of each branch's own weight)."""
        kh, kw = self.kernel_size
        in_per_group = self.in_channels // self.groups
        for p, fan_in in (
                (self.w_avg, in_per_group), (self.w_prior, in_per_group), (self.w_pw, in_per_group),
                (self.w_kxk, in_per_group * kh * kw), (self.w_dw, kh * kw),
        ):
            std = math.sqrt(2.0 / fan_in)
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * std)
        self.mixer.zero_()

    def _grouped(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        return t.reshape(self.groups, rows // self.groups, *t.shape[1:])

    def merge_kernel(self, branches: Sequence[str] = BRANCHES) -> torch.Tensor:
        """The single k x k kernel equal to the scaled sum of ``branches`` (origin always included)."""
        s = self.scales
        kernel = s[0][:, None, None, None] * self.weight
        # avg and prior: 1x1 weights times fixed k x k kernels, in one outer product
        fixed = [(b, w, k) for b, w, k in ((1, self.w_avg, self.avg_kernel), (2, self.w_prior, self.prior_kernel))
                 if BRANCHES[b] in branches]
        if fixed:
            one_by_one = torch.stack([s[b][:, None] * w for b, w, _ in fixed])
            kernel = kernel + torch.einsum('boi,bhw->oihw', one_by_one, torch.stack([k for _, _, k in fixed]))
        if 'dw_pw' in branches:
            # depthwise then pointwise: K[o, i] = P[o, i] * D[input channel i of o's group]
            pw = self._grouped(s[4][:, None] * self.w_pw, self.out_channels)  # [g, og, ig]
            dw = self._grouped(self.w_dw, self.in_channels)  # [g, ig, kh, kw]
            kernel = kernel + torch.einsum('goi,gihw->goihw', pw, dw).reshape_as(self.weight)
        if 'mix_kxk' in branches:
            kernel = kernel + self._mix_kxk_kernel()
        return kernel

    def _mix_kxk_kernel(self) -> torch.Tensor:
        """Branch 3 merged: the k x k conv composed with the 1x1 mixer, scaled."""
        mixer = self._grouped(self.mixer + self.mixer_identity, self.in_channels)  # [g, ig, ig]
        kxk = self._grouped(self.scales[3][:, None, None, None] * self.w_kxk, self.out_channels)
        return torch.einsum('gomhw,gmi->goihw', kxk, mixer).reshape_as(self.weight)

    def plan(self, x: torch.Tensor) -> FrozenSet[str]:
        """The branches to merge into the kernel for input ``x``; the others run on the activations.

        Empty: every branch runs on the activations, origin included (its scale then multiplies
        the conv's output instead of the kernel). See :func:`cbr_step_costs` for the costs compared.
        """
        return choose_plan(cbr_step_costs(self, x))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return self._spatial_conv(x, weight, bias, self.groups)

    def _single_tap(self, x: torch.Tensor) -> Optional[Tuple[int, int]]:
        """On a 1x1 map with a 1x1 output (late stages of 32 px inputs) every other tap of the
        kernel meets zero padding: the kernel tap that meets the one input position, if any."""
        if tuple(x.shape[-2:]) != (1, 1) or conv_output_size(self, x) != (1, 1):
            return None
        if self.padding == 'same':
            padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        else:
            padding = (0, 0) if self.padding == 'valid' else self.padding
        if any(p % d for p, d in zip(padding, self.dilation)):
            return None
        return padding[0] // self.dilation[0], padding[1] // self.dilation[1]

    def _spatial_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int):
        """F.conv2d with this conv's geometry; on a single position, only the tap it meets (mkldnn
        would run the whole k x k kernel, and its depthwise path is slowest on such maps)."""
        tap = self._single_tap(x)
        if tap is None:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)
        h, w = tap
        if groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1:  # depthwise: a per-channel scale
            # a multiply is not an autocast op: compute in the dtype autocast gives the conv
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            out = x.to(dtype) * weight[:, 0, h, w].to(dtype)[:, None, None]
            return out if bias is None else out + bias.to(dtype)[:, None, None]
        return F.conv2d(x, weight[:, :, h:h + 1, w:w + 1], bias, 1, 0, 1, groups)

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight[..., None, None], None, 1, 0, 1, self.groups)

    def _scaled_conv(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """conv(x, scale * weight), the scale applied to whichever of kernel and output is smaller."""
        out_numel = x.shape[0] * self.out_channels * math.prod(conv_output_size(self, x))
        if out_numel < weight.numel():
            out = self._conv(x, weight, None)
            return out * scale.to(out.dtype)[:, None, None]  # under autocast: stay in the conv's dtype
        return self._conv(x, scale[:, None, None, None] * weight, None)

    def _fixed_kernel_branches(self, x: torch.Tensor, which: Sequence[int]) -> torch.Tensor:
        """avg / prior on the activations: a 1x1 conv, then each fixed k x k kernel per channel."""
        s, g, og = self.scales, self.groups, self.out_channels // self.groups
        weights = {1: self.w_avg, 2: self.w_prior}
        fixed = {1: self.avg_kernel, 2: self.prior_kernel}
        # rows ordered (group, branch, channel) so that one grouped 1x1 conv computes all branches
        one_by_one = torch.stack([self._grouped(s[b][:, None] * weights[b], self.out_channels) for b in which], 1)
        y = self._pointwise(x, one_by_one.reshape(-1, one_by_one.shape[-1]))
        spatial = torch.stack([fixed[b] for b in which])[None, :, None].expand(g, -1, og, -1, -1)
        y = self._spatial_conv(y, spatial.reshape(-1, 1, *self.kernel_size), None, y.shape[1])
        return y.unflatten(1, (g, len(which), og)).sum(2).flatten(1, 2)

    def _on_activations(self, x: torch.Tensor, branches: Sequence[str]) -> List[torch.Tensor]:
        s, out = self.scales, []
        if 'origin' in branches:
            out.append(self._scaled_conv(x, self.weight, s[0]))
        fixed = [b for b in (1, 2) if BRANCHES[b] in branches]
        if fixed:
            out.append(self._fixed_kernel_branches(x, fixed))
        if 'mix_kxk' in branches:
            mixed = self._pointwise(x, self.mixer + self.mixer_identity)
            out.append(self._scaled_conv(mixed, self.w_kxk, s[3]))
        if 'dw_pw' in branches:
            dw = self._spatial_conv(x, self.w_dw[:, None], None, self.in_channels)
            out.append(self._pointwise(dw, s[4][:, None] * self.w_pw))
        return out

    def forward(self, x: torch.Tensor, merge: Optional[Iterable[str]] = None) -> torch.Tensor:
        """``merge``: the branches to merge into one kernel (default: the cheaper plan for ``x``,
        see :meth:`plan`); True / False merge all / none. Every choice computes the same function."""
        if merge is None:
            merge = self.plan(x)
        elif merge is True or merge is False:
            merge = BRANCHES if merge else ()
        merge = frozenset(merge)
        if merge:
            outs = [self._conv(x, self.merge_kernel(merge | {'origin'}), self.bias)]
            outs += self._on_activations(x, [b for b in BRANCHES if b not in merge and b != 'origin'])
        else:
            outs = self._on_activations(x, BRANCHES)
            if self.bias is not None:
                outs[0] = outs[0] + self.bias.to(outs[0].dtype)[:, None, None]
        out = outs[0]
        for o in outs[1:]:
            out = out + o
        return out

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """A plain conv with the merged kernel (what gets deployed)."""
        w = self.weight
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=self.bias is not None, device=w.device, dtype=w.dtype,
        )
        conv.weight.copy_(self.merge_kernel())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, groups={self.groups}, branches={len(BRANCHES)}')


# The cost model's two machine constants. Elementwise passes over kernel- or activation-sized
# tensors are bound by memory, convolutions by arithmetic: a byte moved is priced at
# BYTE_COST FLOPs. Depthwise convs run far below a dense conv's FLOP rate (mkldnn on this CPU:
# 4x to 250x, slowest on the smallest maps): their FLOPs are priced DEPTHWISE_COST times higher.
# Set from per-layer timings (benchmarks/step_cost.py --cbr-layers, benchmarks/README.md).
BYTE_COST = 16.0
DEPTHWISE_COST = 200.0
# Passes over a kernel-sized tensor (reads + writes, forward + backward) that merging a branch
# adds, as implemented in CBRConv2d.merge_kernel under eager autograd.
MERGE_PASSES = {'origin': 8, 'avg': 4, 'prior': 4, 'mix_kxk': 14, 'dw_pw': 10}


def conv_output_size(m: CBRConv2d, x: torch.Tensor) -> Tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == 'same':
            return tuple(x.shape[-2:])
        padding = (0, 0)
    else:
        padding = m.padding
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(x.shape[-2:], padding, m.dilation, m.kernel_size, m.stride))


def cbr_step_costs(m: CBRConv2d, x: torch.Tensor) -> Dict[str, Tuple[float, float]]:
    """Per branch, (merge, on_activations): the cost one training step (forward and backward,
    weight gradients included) adds for it, beyond the single conv every plan runs.

    Merging costs passes over kernel-sized tensors (plus mix_kxk's matrix product, which does
    not depend on the batch); running on the activations costs the branch's own convs
    (FLOPs) and passes over output-sized tensors. Both grow with different things: the kernel
    with C_out * C_in, the activations with batch x positions.
    """
    kh, kw = m.kernel_size
    k2 = kh * kw
    o, c_in, ig = m.out_channels, m.in_channels, m.in_channels // m.groups
    n = x.shape[0]
    p_in = x.shape[-2] * x.shape[-1]
    p_out = math.prod(conv_output_size(m, x))
    kernel_bytes = m.weight.numel() * m.weight.element_size() * BYTE_COST
    out_bytes = n * o * p_out * x.element_size() * BYTE_COST
    scale = min(8 * out_bytes, 8 * kernel_bytes)  # the scale goes on the smaller (CBRConv2d._scaled_conv)
    add = 3 * out_bytes  # one more output summed
    pointwise_out = 2 * 3 * o * ig * n * p_out  # 1x1 conv at the output, fwd + input and weight grads
    merge = {b: MERGE_PASSES[b] * kernel_bytes for b in BRANCHES}
    merge['mix_kxk'] += 2 * 3 * o * ig * ig * k2
    fixed = 2 * 3 * o * ig * n * p_in + DEPTHWISE_COST * 2 * 2 * o * k2 * n * p_out + 2 * out_bytes + add
    act = {
        'origin': scale,
        'avg': fixed,
        'prior': fixed,
        'mix_kxk': 2 * 3 * (c_in * ig * n * p_in + o * ig * k2 * n * p_out) + scale + add,
        'dw_pw': DEPTHWISE_COST * 2 * 3 * c_in * k2 * n * p_out + pointwise_out + add,
    }
    return {b: (merge[b], act[b]) for b in BRANCHES}


def choose_plan(costs: Dict[str, Tuple[float, float]]) -> FrozenSet[str]:
    """Branch by branch the cheaper side; merging anything also pays for the origin's merge,
    so the result is compared against running every branch on the activations."""
    others = [b for b in BRANCHES if b != 'origin']
    merged = frozenset(b for b in others if costs[b][0] < costs[b][1])
    if not merged:
        return frozenset()
    with_merge = costs['origin'][0] + sum(min(costs[b]) for b in others)
    without = sum(costs[b][1] for b in BRANCHES)
    return merged | {'origin'} if with_merge < without else frozenset()


def is_cbr_candidate(module: nn.Module) -> bool:
    """Plain k x k (k > 1) stride-1 convs with zero padding; subclasses (e.g. weight-standardized
    convs) compute something other than a linear function of their kernel and are left alone."""
    return (
        type(module) is nn.Conv2d
        and max(module.kernel_size) > 1
        and tuple(module.stride) == (1, 1)
        and module.padding_mode == 'zeros'
    )


def _set_submodule(model: nn.Module, path: str, new: nn.Module):
    parent_path, _, name = path.rpartition('.')
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def convert_to_cbr(model: nn.Module, init: str = 'scratch', seed: int = 0) -> List[str]:
    """Replace every CBR candidate conv of ``model`` in place; returns the converted paths."""
    generator = torch.Generator().manual_seed(seed)
    paths = [name for name, m in model.named_modules() if is_cbr_candidate(m)]
    for path in paths:
        _set_submodule(model, path, CBRConv2d.from_conv(model.get_submodule(path), init, generator))
    return paths


def merge_cbr(model: nn.Module) -> List[str]:
    """Replace every ``CBRConv2d`` of ``model`` in place by its merged ``nn.Conv2d``."""
    paths = [name for name, m in model.named_modules() if isinstance(m, CBRConv2d)]
    for path in paths:
        _set_submodule(model, path, model.get_submodule(path).to_conv())
    return paths
