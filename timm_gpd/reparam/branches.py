"""Channel-Branch Reparameterization (CBR): a k x k conv trained as several linear branches.

Every branch is linear in its weights, so the sum of branches is one k x k kernel. The
kernel is merged on every forward (training sees the richer parameterization), and
extraction writes the merged kernel into a plain ``nn.Conv2d``.

Branches, each with a learnable per-output-channel scale (``scales[b]``):

0. ``origin``  : the k x k kernel itself.
1. ``avg``     : 1x1 conv then k x k average (outer product with a constant kernel).
2. ``prior``   : 1x1 conv times a fixed 2-D DCT basis element (a frequency prior).
3. ``mix_kxk`` : 1x1 conv C_in -> C_in (identity + learnable) then a k x k conv.
4. ``dw_pw``   : depthwise k x k conv then 1x1 pointwise conv.

Branch 3's merge is a matrix product costing O * (C_in/g)^2 * k^2 multiply-adds, which can
exceed the convolution itself on small batches or feature maps. Per forward, the cheaper of
merging it and running it on the activations is used; both compute the same function.
"""
import math
from typing import List, Optional, Tuple

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

    def merge_kernel(self, include_mix_kxk: bool = True) -> torch.Tensor:
        """The single k x k kernel equal to the scaled sum of the branches."""
        s = self.scales
        kernel = s[0][:, None, None, None] * self.weight
        # avg and prior: 1x1 weights times fixed k x k kernels, in one outer product
        one_by_one = torch.stack([s[1][:, None] * self.w_avg, s[2][:, None] * self.w_prior])
        fixed = torch.stack([self.avg_kernel, self.prior_kernel])
        kernel = kernel + torch.einsum('boi,bhw->oihw', one_by_one, fixed)
        # depthwise then pointwise: K[o, i] = P[o, i] * D[input channel i of o's group]
        pw = self._grouped(s[4][:, None] * self.w_pw, self.out_channels)  # [g, og, ig]
        dw = self._grouped(self.w_dw, self.in_channels)  # [g, ig, kh, kw]
        kernel = kernel + torch.einsum('goi,gihw->goihw', pw, dw).reshape_as(self.weight)
        if include_mix_kxk:
            kernel = kernel + self._mix_kxk_kernel()
        return kernel

    def _mix_kxk_kernel(self) -> torch.Tensor:
        """Branch 3 merged: the k x k conv composed with the 1x1 mixer, scaled."""
        mixer = self._grouped(self.mixer + self.mixer_identity, self.in_channels)  # [g, ig, ig]
        kxk = self._grouped(self.scales[3][:, None, None, None] * self.w_kxk, self.out_channels)
        return torch.einsum('gomhw,gmi->goihw', kxk, mixer).reshape_as(self.weight)

    def merge_is_cheaper(self, x: torch.Tensor) -> bool:
        """Compare multiply-adds of merging the mix_kxk branch vs. running it on ``x``."""
        kh, kw = self.kernel_size
        in_per_group = self.in_channels // self.groups
        merge = self.out_channels * in_per_group * in_per_group * kh * kw
        positions = x.shape[0] * x.shape[-2] * x.shape[-1]
        on_activations = positions * (self.in_channels * in_per_group + self.out_channels * in_per_group * kh * kw)
        return merge <= on_activations

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor, merge: Optional[bool] = None) -> torch.Tensor:
        if merge is None:
            merge = self.merge_is_cheaper(x)
        if merge:
            return self._conv(x, self.merge_kernel(), self.bias)
        out = self._conv(x, self.merge_kernel(include_mix_kxk=False), self.bias)
        mixer = (self.mixer + self.mixer_identity)[..., None, None]
        mixed = F.conv2d(x, mixer, None, 1, 0, 1, self.groups)
        kxk = self.scales[3][:, None, None, None] * self.w_kxk
        return out + self._conv(mixed, kxk, None)

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
