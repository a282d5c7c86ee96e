"""Channel maps of the replica convention and the tensor operations built on them.

A student dimension of C channels becomes C' >= C channels in the dynamic teacher
(DT). DT channel j holds a copy of student channel ``j % C`` (copy-major layout),
so the first C channels are the student's own ("primary") and channel c has
``n_c`` copies. A dimension may consist of several such segments laid end to end
(the fused q/k/v rows of an attention projection are three).

Every tensor dimension is widened in one of two ways:

* ``copy``: the dimension indexes outputs or per-channel values (conv rows,
  BatchNorm gamma, biases): DT entries are gathered copies.
* ``mix``: the dimension is contracted against an expanded activation (the input
  columns of a dense conv / linear): gathered copies divided by ``n_c``, so the
  ``n_c`` copies of an input channel add back up to the student's weight.

The student view reverses this: select the primary positions and, for ``mix``
dimensions, multiply by ``n_c``.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

COPY = 'copy'
MIX = 'mix'


def widened_size(channels: int, ratio: float) -> int:
    """Width of a dimension of ``channels`` in the DT (a function of the width alone, so that
    every tensor touching the same activation agrees on it)."""
    return int(math.floor(channels * ratio + 0.5))


@dataclass(frozen=True)
class ChannelMap:
    """Student segment sizes and their DT sizes along one tensor dimension."""
    sizes: Tuple[int, ...]
    wide: Tuple[int, ...]

    @classmethod
    def single(cls, channels: int, ratio: float) -> 'ChannelMap':
        return cls((channels,), (widened_size(channels, ratio),))

    @classmethod
    def identity(cls, channels: int) -> 'ChannelMap':
        return cls((channels,), (channels,))

    @classmethod
    def segmented(cls, channels: int, segments: int, ratio: float) -> 'ChannelMap':
        wide = widened_size(channels, ratio)
        return cls((channels,) * segments, (wide,) * segments)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def wide_size(self) -> int:
        return sum(self.wide)

    @property
    def expanded(self) -> bool:
        return self.wide != self.sizes

    @property
    def uniform(self) -> bool:
        """True when every student channel has the same number of copies."""
        return all(w % s == 0 for s, w in zip(self.sizes, self.wide))

    def source_index(self) -> torch.Tensor:
        """For each DT position, the student position it copies."""
        parts, offset = [], 0
        for s, w in zip(self.sizes, self.wide):
            parts.append(offset + torch.arange(w) % s)
            offset += s
        return torch.cat(parts)

    def primary_index(self) -> torch.Tensor:
        """For each student position, the DT position of its first copy."""
        parts, offset = [], 0
        for s, w in zip(self.sizes, self.wide):
            parts.append(offset + torch.arange(s))
            offset += w
        return torch.cat(parts)

    def is_primary(self) -> torch.Tensor:
        mask = torch.zeros(self.wide_size, dtype=torch.bool)
        mask[self.primary_index()] = True
        return mask

    def copies(self) -> torch.Tensor:
        """Number of copies of each student position (float, for scaling).

        Closed form of ``bincount(source_index())``: position c of a segment of s channels widened
        to w has ``w // s`` copies, plus one if ``c < w % s``. bincount's output shape depends on
        data, which makes torch.compile break the graph at every student_view.
        """
        return torch.cat([
            (w // s + (torch.arange(s) < w % s).long()).float() for s, w in zip(self.sizes, self.wide)])

    def copy_count(self) -> Optional[int]:
        """The number of copies when every student position has the same number, else None.

        Plain Python, so that student_view branches on no tensor data (torch.compile, jit.trace).
        """
        counts = {w // s for s, w in zip(self.sizes, self.wide)}
        return counts.pop() if self.uniform and len(counts) == 1 else None

    def primary_slices(self) -> Tuple[Tuple[int, int], ...]:
        """(start, length) runs of primary DT positions: narrow() is cheaper than index_select."""
        runs, offset = [], 0
        for s, w in zip(self.sizes, self.wide):
            runs.append((offset, s))
            offset += w
        return tuple(runs)


@dataclass(frozen=True)
class TensorPlan:
    """How each widened dimension of one tensor maps between student and DT."""
    dims: Tuple[Tuple[int, ChannelMap, str], ...]  # (dim, channel map, COPY or MIX)

    @property
    def mix_dim(self) -> Optional[Tuple[int, ChannelMap]]:
        for dim, cmap, kind in self.dims:
            if kind == MIX and cmap.expanded:
                return dim, cmap
        return None

    def wide_shape(self, shape: torch.Size) -> Tuple[int, ...]:
        out = list(shape)
        for dim, cmap, _ in self.dims:
            out[dim] = cmap.wide_size
        return tuple(out)


def _along(vec: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.reshape(shape)


def widen_tensor(t: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
    """Student tensor -> DT tensor (replicas; ``mix`` dims divided by the copy count)."""
    for dim, cmap, kind in plan.dims:
        if not cmap.expanded:
            continue
        src = cmap.source_index().to(t.device)
        t = t.index_select(dim, src)
        if kind == MIX:
            t = t / _along(cmap.copies().to(t)[src], dim, t.ndim)
    return t


def student_view(t: torch.Tensor, plan: TensorPlan) -> torch.Tensor:
    """DT tensor -> the student's tensor (differentiable: gradients reach the primary slice)."""
    for dim, cmap, kind in plan.dims:
        if not cmap.expanded:
            continue
        runs = cmap.primary_slices()
        if len(runs) == 1:
            t = t.narrow(dim, *runs[0])
        else:
            t = torch.cat([t.narrow(dim, *r) for r in runs], dim)
        if kind == MIX:
            count = cmap.copy_count()
            if count is not None:
                t = t * float(count)
            else:
                t = t * _along(cmap.copies().to(t), dim, t.ndim)
    return t


def _scatter_into_primary(grad: torch.Tensor, student_grad: torch.Tensor, plan: TensorPlan):
    """grad[primary block] += the gradient ``student_view`` passes back from ``student_grad``."""
    pairs = [(grad, student_grad)]
    for dim, cmap, kind in plan.dims:
        if not cmap.expanded:
            continue
        if kind == MIX:
            count = cmap.copy_count()
            scale = float(count) if count is not None else _along(cmap.copies().to(student_grad), dim, grad.ndim)
            pairs = [(t, s * scale) for t, s in pairs]
        split = []
        for t, s in pairs:
            offset = 0
            for start, length in cmap.primary_slices():
                split.append((t.narrow(dim, start, length), s.narrow(dim, offset, length)))
                offset += length
        pairs = split
    for t, s in pairs:
        t.add_(s)


class _SharedTensor(torch.autograd.Function):
    """A DT tensor and its student view, whose backward adds the student's gradient into the
    primary block of the DT's instead of building a DT-sized zero tensor around it (what
    autograd does for a slice) and adding that."""

    @staticmethod
    def forward(ctx, wide: torch.Tensor, plan: TensorPlan, decoupled: bool):
        ctx.plan, ctx.decoupled = plan, decoupled
        ctx.wide_meta = (wide.shape, wide.dtype, wide.device)
        return wide.view_as(wide), student_view(wide, plan)

    @staticmethod
    def backward(ctx, wide_grad: Optional[torch.Tensor], student_grad: Optional[torch.Tensor]):
        if student_grad is None:
            return wide_grad, None
        if wide_grad is None:
            shape, dtype, device = ctx.wide_meta
            grad = torch.zeros(shape, dtype=dtype, device=device)
        else:
            # a copy, not in place: the engine may hand the same gradient tensor to other nodes
            grad = wide_grad.clone()
        if ctx.decoupled:
            student_grad = student_grad / _view_scale(ctx.plan, student_grad) ** 2
        _scatter_into_primary(grad, student_grad, plan=ctx.plan)
        return grad, None, None


def _view_scale(plan: TensorPlan, student: torch.Tensor):
    """The factor ``student_view`` multiplies the primary slice by (the copy counts of the mixed
    dimension), broadcastable against the student's tensor."""
    mix = plan.mix_dim
    if mix is None:
        return 1.
    dim, cmap = mix
    count = cmap.copy_count()
    if count is not None:
        return float(count)
    return _along(cmap.copies().to(student), dim, student.ndim)


def shared_tensor(wide: torch.Tensor, plan: TensorPlan, decoupled: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the DT tensor, its student view) for a forward that uses both: one gradient reaches
    ``wide``, the student's added into the primary block (the same values autograd gives for
    ``wide`` and ``student_view(wide, plan)`` used separately, with fewer passes over DT-sized
    tensors).

    ``decoupled``: the student's gradient is divided by the square of the view's scale first, so
    that under SGD the student's own loss moves its weights at the optimizer's lr, as it would
    move a standalone student's, instead of ``copies**2`` times it (an ablation, not the
    published method)."""
    return _SharedTensor.apply(wide, plan, decoupled)


def symmetry_noise(wide: torch.Tensor, plan: TensorPlan, std: float, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Noise for a DT tensor that leaves both the DT function and the student view unchanged.

    Along the ``mix`` dimension the noise over the copies of each input channel sums to
    zero (the copies see the same activation, so only the sum reaches the output), and it
    is zero where every widened dimension is primary (the student's own block).
    Returns None when the tensor has no freedom for such noise.
    """
    mix = plan.mix_dim
    if mix is None or std <= 0:
        return None
    mix_dim, mix_map = mix
    counts = mix_map.copies()
    row_dims = [(d, c) for d, c, _ in plan.dims if d != mix_dim and c.expanded]
    if not bool((counts > 1).any()) or (not row_dims and not bool((counts > 2).any())):
        return None
    if mix_map.uniform and len(mix_map.sizes) == 1 and all(len(c.sizes) == 1 for _, c in row_dims):
        noise = _uniform_symmetry_noise(wide.shape, mix_dim, mix_map, row_dims, generator)
        return (noise * std).to(dtype=wide.dtype, device=wide.device)
    src, primary = mix_map.source_index(), mix_map.primary_index()
    ndim = wide.ndim
    noise = torch.randn(wide.shape, generator=generator)
    # zero-sum over the copies of every input channel
    group_shape = list(wide.shape)
    group_shape[mix_dim] = mix_map.size
    total = torch.zeros(group_shape).index_add_(mix_dim, src, noise)
    noise -= (total / _along(counts, mix_dim, ndim)).index_select(mix_dim, src)
    # in the student's rows, move the noise of each primary copy onto the other copies
    rows = torch.ones(())
    for dim, cmap in row_dims:
        rows = rows * _along(cmap.is_primary().float(), dim, ndim)
    at_primary = noise.index_select(mix_dim, primary) * rows
    spread = at_primary / _along((counts - 1).clamp(min=1), mix_dim, ndim)
    noise += spread.index_select(mix_dim, src) * _along((~mix_map.is_primary()).float(), mix_dim, ndim)
    noise.index_add_(mix_dim, primary, -at_primary)
    return (noise * std).to(dtype=wide.dtype, device=wide.device)


def _uniform_symmetry_noise(shape, mix_dim, mix_map, row_dims, generator) -> torch.Tensor:
    """Same construction as :func:`symmetry_noise` when every input channel has r copies laid
    out copy-major: the copies become their own axis, so everything is a reshape or a view."""
    copies, channels = mix_map.wide_size // mix_map.size, mix_map.size
    split = tuple(shape[:mix_dim]) + (copies, channels) + tuple(shape[mix_dim + 1:])
    noise = torch.randn(split, generator=generator)
    noise -= noise.mean(mix_dim, keepdim=True)
    student_rows = noise
    for dim, cmap in row_dims:
        student_rows = student_rows.narrow(dim if dim < mix_dim else dim + 1, 0, cmap.size)
    primary = student_rows.select(mix_dim, 0)
    student_rows.narrow(mix_dim, 1, copies - 1).add_(primary.unsqueeze(mix_dim) / (copies - 1))
    primary.zero_()
    return noise.flatten(mix_dim, mix_dim + 1)
