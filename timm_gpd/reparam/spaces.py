"""Channel segments of every activation, traced through one forward of the student.

The dynamic teacher (DT) lays an activation of C student channels out copy-major: DT channel j
copies student channel ``j % C``. A block that concatenates activations along channels, or
splits one by a count, breaks that single layout: two copy-major parts laid end to end are not
copy-major over their sum, and the first half of a copy-major activation holds copies of every
channel, not of the first half. So each activation is described as a run of **segments**, each
copy-major on its own. A concatenation is its parts' segments end to end; a split at a segment
boundary hands each part whole segments; both then follow in the DT with their counts scaled.
(An element-major layout, each channel's copies adjacent, is the finest such segmentation: it
would follow every concatenation too, but change the DT of every family. Segments are the
coarsest layout that follows what the model does, and models without concatenations or splits
keep one segment per activation: their DT is exactly the global copy-major one.)

Which segments each activation needs is found by following one eval-mode forward:

* every conv / linear output is a new *space* of channels (one segment to begin with);
* ``torch.cat`` along channels describes its output by its inputs' segments;
* a split, ``narrow`` or slice along channels cuts the space it cuts at that position;
* tensors combined elementwise (residual adds, gates, a module called twice) share one layout,
  so each one's cuts are applied to the other, until nothing changes;
* a grouped conv's output is cut where its input is (and back), in whole groups.

The result is, per module path, the segment sizes of its input and output. Rules that can lay a
tensor out in segments read them (:class:`~timm_gpd.reparam.rules.RuleContext`); any other rule
meeting more than one segment refuses. A forward this tracing cannot follow (a reshape that moves
channels) leaves its outputs undescribed, which their consumers read as one segment: the DT's
exactness check is what stands behind that.
"""
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .branches import CBRConv2d

Sizes = Optional[Tuple[int, ...]]
# modules that make new channels from all (or a group) of their inputs: each output is a new space
MIXING = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear, CBRConv2d)
_CAT = tuple(f for f in (torch.cat, getattr(torch, 'concat', None), getattr(torch, 'concatenate', None)) if f)
_SPLITS = {'split', 'split_with_sizes', 'chunk', 'tensor_split', 'unsafe_split', 'unsafe_chunk'}
_REDUCTIONS = {'sum', 'mean', 'amax', 'amin', 'nansum', 'nanmean', 'logsumexp'}
# a reshape [B, C, H, W] -> [B, k, C / k, H, W] is read as k parts weighed against each other (SKNet's
# paths, ResNeSt's radix) only for a few large parts: a channel shuffle views many small ones
_MAX_PARTS = 4


@dataclass(frozen=True)
class _Channels:
    """The channels of one tensor: ``segs`` = (space, start, stop) runs, along dim ``cdim``."""
    segs: Tuple[Tuple[int, int, int], ...]
    cdim: int

    @property
    def size(self) -> int:
        return sum(e - s for _, s, e in self.segs)


@dataclass
class ChannelSpaces:
    """Per module path, the segment sizes of its (first tensor) input and output, or None where
    the tracing could not follow the channels; and the modules whose channels cannot be laid out
    in segments, with the reason."""
    io: Dict[str, Tuple[Sizes, Sizes]] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)
    calls: Dict[str, List[Sizes]] = field(default_factory=dict)  # each call's input segments, in order

    def inputs(self, path: str) -> Sizes:
        return self.io.get(path, (None, None))[0]

    def outputs(self, path: str) -> Sizes:
        return self.io.get(path, (None, None))[1]


def _tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _index_channels(key, ndim: int, cdim: int):
    """For ``t[key]``: (the output's channel dim, the slice taken along the channels), or None
    when the key is not plain ints / slices / None / one Ellipsis, or indexes the channels by int."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        return None
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        used = sum(1 for k in key if k is not None and k is not Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - used) + key[i + 1:]
    dim = out_dim = 0
    new_cdim, chan = None, slice(None)
    for k in key:
        if k is None:
            out_dim += 1
            continue
        if isinstance(k, bool) or not isinstance(k, (int, slice)):
            return None
        if dim == cdim:
            if not isinstance(k, slice):
                return None
            chan, new_cdim = k, out_dim
        if isinstance(k, slice):
            out_dim += 1
        dim += 1
    if new_cdim is None:
        new_cdim = out_dim + (cdim - dim)
    return new_cdim, chan


class _Tracer(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.space_sizes: List[int] = []
        self.cuts: List[Set[int]] = []
        self.ties: List[Tuple[_Channels, _Channels]] = []
        self.grouped: List[Tuple[str, _Channels, int, int]] = []  # (path, input, output space, groups)
        # id -> (weak reference, channels): an id reused by a later tensor finds its reference dead
        self.known: Dict[int, Tuple[weakref.ref, _Channels]] = {}
        self.io: Dict[str, List[Optional[_Channels]]] = {}
        self.module_space: Dict[str, int] = {}
        self.calls: Dict[str, List[Optional[_Channels]]] = {}  # every call's input, in order
        self.inside = 0  # > 0 inside a mixing module's forward: its own ops are not followed
        self.failure: Optional[str] = None

    # ---- bookkeeping

    def new_space(self, n: int) -> int:
        self.space_sizes.append(n)
        self.cuts.append(set())
        return len(self.space_sizes) - 1

    def channels(self, t) -> Optional[_Channels]:
        entry = self.known.get(id(t)) if isinstance(t, torch.Tensor) else None
        if entry is None or entry[0]() is not t:
            return None
        c = entry[1]
        return c if c.cdim < t.ndim and t.shape[c.cdim] == c.size else None

    def describe(self, t: torch.Tensor, c: Optional[_Channels]):
        if c is None or c.cdim >= t.ndim or t.shape[c.cdim] != c.size:
            return
        old = self.channels(t)
        if old is not None:  # written in place (+=): both layouts are one
            self.tie(old, c)
            return
        self.known[id(t)] = (weakref.ref(t), c)

    def tie(self, a: _Channels, b: _Channels):
        if a.size == b.size and a.segs != b.segs:
            self.ties.append((a, b))

    def cut(self, c: _Channels, p: int) -> bool:
        """Cut the space under position ``p`` of ``c`` (no-op at a segment's end)."""
        offset = 0
        for space, s, e in c.segs:
            if offset < p < offset + e - s:
                at = s + p - offset
                if at in self.cuts[space]:
                    return False
                self.cuts[space].add(at)
                return True
            offset += e - s
        return False

    def subrange(self, c: _Channels, a: int, b: int, cdim: int) -> _Channels:
        self.cut(c, a)
        self.cut(c, b)
        segs, offset = [], 0
        for space, s, e in c.segs:
            lo, hi = max(a, offset), min(b, offset + e - s)
            if lo < hi:
                segs.append((space, s + lo - offset, s + hi - offset))
            offset += e - s
        return _Channels(tuple(segs), cdim)

    def pieces(self, c: _Channels) -> List[Tuple[int, int, int]]:
        out = []
        for space, s, e in c.segs:
            bounds = [s] + sorted(p for p in self.cuts[space] if s < p < e) + [e]
            out += [(space, a, b) for a, b in zip(bounds, bounds[1:])]
        return out

    def boundaries(self, c: _Channels) -> Set[int]:
        found, offset = set(), 0
        for _, a, b in self.pieces(c)[:-1]:
            offset += b - a
            found.add(offset)
        return found

    # ---- following torch functions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside == 0 and self.failure is None:
            try:
                self.follow(func, args, kwargs, out)
            except Exception as e:  # a gap in this tracing must not break the model's forward
                self.failure = f'{getattr(func, "__name__", func)}: {type(e).__name__}: {e}'
        return out

    def follow(self, func, args, kwargs, out):
        name = getattr(func, '__name__', '')
        if name == '__setitem__' and len(args) == 3:
            self.follow_setitem(*args)
            return
        outs = _tensors(out)
        if not outs:
            return
        if func in _CAT:
            self.follow_cat(args, kwargs, outs[0])
            return
        if func is torch.stack:
            self.follow_stack(args, kwargs, outs[0])
            return
        ins = [(t, c) for t in _tensors((args, kwargs)) if (c := self.channels(t)) is not None]
        if not ins:
            return
        first = args[0] if args else None
        source = self.channels(first)
        if source is not None:
            if name == '__getitem__' and len(args) > 1:
                self.follow_index(first, source, args[1], outs[0])
                return
            if name == 'narrow':
                dim = (args[1] if len(args) > 1 else kwargs['dim']) % first.ndim
                start = args[2] if len(args) > 2 else kwargs['start']
                length = args[3] if len(args) > 3 else kwargs['length']
                start = start % source.size if dim == source.cdim and start < 0 else start
                if dim == source.cdim:
                    self.describe(outs[0], self.subrange(source, start, start + length, source.cdim))
                else:
                    self.describe(outs[0], source)
                return
            if name in _SPLITS and isinstance(out, (tuple, list)):
                self.follow_split(first, source, outs)
                return
            if name in ('permute', 'transpose', 'swapaxes') and outs[0].ndim == first.ndim:
                self.follow_permute(name, first, source, args[1:], outs[0])
                return
            if name in _REDUCTIONS and len(outs) == 1 and outs[0].ndim < first.ndim:
                dims = args[1] if len(args) > 1 else kwargs.get('dim')
                if dims is not None:
                    dims = {d % first.ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
                    if source.cdim not in dims:
                        self.describe(outs[0], _Channels(source.segs, source.cdim - sum(d < source.cdim for d in dims)))
                    return
            if name in ('view', 'reshape') and len(outs) == 1 and self.follow_reshape(first, source, outs[0]):
                return
        for o in outs:
            matches = [(c, cdim) for t, c in ins if (cdim := self.kept_dim(t, c, o)) is not None]
            if matches:
                c, cdim = matches[0]
                for other, _ in matches[1:]:
                    self.tie(c, other)
                self.describe(o, _Channels(c.segs, cdim))

    @staticmethod
    def kept_dim(t: torch.Tensor, c: _Channels, o: torch.Tensor) -> Optional[int]:
        """The dim of ``o`` holding ``t``'s channels when an op keeps them per channel (elementwise,
        norms, pooling, flatten of a pooled map), else None."""
        if o.ndim == t.ndim and o.shape[c.cdim] == c.size:
            return c.cdim
        if c.cdim == 1 and 2 <= o.ndim < t.ndim and tuple(o.shape[:2]) == tuple(t.shape[:2]):
            return 1
        if (c.cdim == 1 and t.ndim == 2 and o.ndim > 2 and tuple(o.shape[:2]) == tuple(t.shape)
                and all(s == 1 for s in o.shape[2:])):  # [B, C] -> [B, C, 1, 1]
            return 1
        return None

    def follow_cat(self, args, kwargs, out: torch.Tensor):
        tensors = list(args[0] if args else kwargs['tensors'])
        dim = args[1] if len(args) > 1 else kwargs.get('dim', 0)
        dim %= out.ndim
        parts = [self.channels(t) for t in tensors]
        known = [c for c in parts if c is not None]
        if not known or len({c.cdim for c in known}) != 1:
            return
        cdim = known[0].cdim
        if dim == cdim:
            if len(known) == len(parts):
                self.describe(out, _Channels(tuple(s for c in parts for s in c.segs), cdim))
            return
        for c in known[1:]:  # joined along tokens / batch: one channel layout
            self.tie(known[0], c)
        self.describe(out, known[0])

    def follow_index(self, t: torch.Tensor, c: _Channels, key, out: torch.Tensor):
        found = _index_channels(key, t.ndim, c.cdim)
        if found is None:
            cdim = self.kept_dim(t, c, out)
            if cdim is not None:
                self.describe(out, _Channels(c.segs, cdim))
            return
        cdim, chan = found
        if chan.step not in (None, 1):
            return
        start, stop, _ = chan.indices(c.size)
        if (start, stop) == (0, c.size):
            self.describe(out, _Channels(c.segs, cdim))
        elif start < stop:
            self.describe(out, self.subrange(c, start, stop, cdim))

    def follow_setitem(self, t, key, value):
        """``t[key] = value`` along the channels: that part of ``t`` takes ``value``'s layout."""
        target, given = self.channels(t), self.channels(value)
        found = _index_channels(key, t.ndim, target.cdim) if target is not None and given is not None else None
        if found is not None and found[1].step in (None, 1):
            start, stop, _ = found[1].indices(target.size)
            part = self.subrange(target, start, stop, target.cdim)
            if part.size == given.size:
                self.tie(part, given)

    def follow_stack(self, args, kwargs, out: torch.Tensor):
        """Tensors stacked on a new dim (SKNet's kernel paths): one channel layout."""
        tensors = list(args[0] if args else kwargs['tensors'])
        dim = args[1] if len(args) > 1 else kwargs.get('dim', 0)
        dim %= out.ndim
        parts = [self.channels(t) for t in tensors]
        if not parts or any(c is None for c in parts) or len({c.cdim for c in parts}) != 1:
            return
        for c in parts[1:]:
            self.tie(parts[0], c)
        cdim = parts[0].cdim
        self.describe(out, _Channels(parts[0].segs, cdim + 1 if dim <= cdim else cdim))

    def follow_reshape(self, t: torch.Tensor, c: _Channels, out: torch.Tensor) -> bool:
        """A reshape of an NCHW map that splits the channels into (k, n) -- k parts of n, which then
        share one layout (SKNet's kernel paths, ResNeSt's radix splits weighed against each other)
        -- or merges such parts back. Only [B, C, H, W] <-> [B, k, n, H, W]: the head splits of
        attention (over tokens or flattened maps) keep their single layout (their rules own it)."""
        shape, new, cdim = tuple(t.shape), tuple(out.shape), c.cdim
        factors = [(i, s) for i, s in enumerate(new) if i > 0 and s != 1]
        # a pooled [B, C, 1, 1] viewed as [B, cardinality, radix, n] (ResNeSt's radix softmax), the
        # channels last (not a conv attention's [B, heads, dims, H * W] at 1 x 1)
        if (len(shape) == 4 and cdim == 1 and shape[2:] == (1, 1) and len(new) == 4 and new[0] == shape[0]
                and factors and math.prod(s for _, s in factors) == c.size and len(factors) <= 2
                and factors[-1][0] == len(new) - 1
                and (len(factors) == 1 or factors[0][1] <= min(_MAX_PARTS, factors[1][1] - 1))):
            if len(factors) == 2:
                (_, k), (at, n) = factors
                parts = [self.subrange(c, i * n, (i + 1) * n, at) for i in range(k)]
                for p in parts[1:]:
                    self.tie(parts[0], p)
                self.describe(out, parts[0])
            elif factors:
                self.describe(out, _Channels(c.segs, factors[0][0]))
            return True
        if len(new) == 2 and new[0] == shape[0] and len(shape) > 2 and cdim == len(shape) - 1:
            # [B, k, ..., n] -> [B, k * n]: the k parts share one layout
            if new[1] == math.prod(shape[1:]) and new[1] % c.size == 0:
                self.describe(out, _Channels(c.segs * (new[1] // c.size), 1))
                return True
        if {len(shape), len(new)} != {4, 5} or cdim != len(shape) - 3:
            return False
        if (len(new) == len(shape) + 1 and new[:cdim] == shape[:cdim] and new[cdim + 2:] == shape[cdim + 1:]
                and new[cdim] * new[cdim + 1] == c.size and 1 < new[cdim] <= _MAX_PARTS and new[cdim] < new[cdim + 1]):
            k, n = new[cdim], new[cdim + 1]
            parts = [self.subrange(c, i * n, (i + 1) * n, cdim + 1) for i in range(k)]
            for p in parts[1:]:
                self.tie(parts[0], p)
            self.describe(out, parts[0])
            return True
        if (cdim >= 1 and len(new) == len(shape) - 1 and new[:cdim - 1] == shape[:cdim - 1]
                and new[cdim:] == shape[cdim + 1:] and new[cdim - 1] == shape[cdim - 1] * c.size):
            self.describe(out, _Channels(c.segs * shape[cdim - 1], cdim - 1))
            return True
        return False

    def follow_permute(self, name: str, t: torch.Tensor, c: _Channels, dims, out: torch.Tensor):
        """The channels move to another dim (NCHW <-> NHWC)."""
        ndim = t.ndim
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
        if len(dims) != (ndim if name == 'permute' else 2):
            return
        if name == 'permute':
            order = [d % ndim for d in dims]
        else:
            a, b = dims[0] % ndim, dims[1] % ndim
            order = list(range(ndim))
            order[a], order[b] = order[b], order[a]
        self.describe(out, _Channels(c.segs, order.index(c.cdim)))

    def follow_split(self, t: torch.Tensor, c: _Channels, outs: Sequence[torch.Tensor]):
        if any(o.ndim != t.ndim for o in outs):
            return
        if all(o.shape[c.cdim] == c.size for o in outs):  # split along another dim
            for o in outs:
                self.describe(o, c)
            return
        if sum(o.shape[c.cdim] for o in outs) != c.size:
            return
        offset = 0
        for o in outs:
            n = o.shape[c.cdim]
            if n:
                self.describe(o, self.subrange(c, offset, offset + n, c.cdim))
            offset += n

    # ---- module hooks

    def pre_hook(self, path: str, m: nn.Module):
        mixing = isinstance(m, MIXING)

        def hook(_, args):
            try:
                x = next(iter(_tensors(args)), None)
                c = self.channels(x) if x is not None else None
                if c is not None and mixing and c.cdim != (x.ndim - 1 if isinstance(m, nn.Linear) else 1):
                    c = None  # the module's channels are not the ones described
                record = self.io.setdefault(path, [c, None])
                if record[0] is not None and c is not None:
                    self.tie(record[0], c)  # one module, one weight: every call's input shares a layout
                self.io[path + '\0current'] = [c, None]
                self.calls.setdefault(path, []).append(c)
            except Exception as e:
                self.failure = self.failure or f'{path}: {type(e).__name__}: {e}'
            if mixing:
                self.inside += 1
        return hook

    def post_hook(self, path: str, m: nn.Module):
        mixing = isinstance(m, MIXING)

        def hook(_, args, out):
            if mixing:
                self.inside -= 1
            if self.inside:
                return
            try:
                y = next(iter(_tensors(out)), None)
                if y is None:
                    return
                if mixing:
                    cdim = y.ndim - 1 if isinstance(m, nn.Linear) else 1
                    space = self.module_space.get(path)
                    if space is None:
                        space = self.module_space[path] = self.new_space(y.shape[cdim])
                    self.describe(y, _Channels(((space, 0, y.shape[cdim]),), cdim))
                    given = self.io[path + '\0current'][0]
                    groups = getattr(m, 'groups', 1)
                    if groups > 1 and given is not None:
                        self.grouped.append((path, given, space, groups))
                record = self.io[path]
                if record[1] is None:
                    record[1] = self.channels(y)
            except Exception as e:
                self.failure = self.failure or f'{path}: {type(e).__name__}: {e}'
        return hook

    # ---- after the forward

    def settle(self) -> Dict[str, str]:
        """Apply the cuts across ties and grouped convs until nothing changes; the modules whose
        groups a cut would split."""
        errors: Dict[str, str] = {}
        changed = True
        while changed:
            changed = False
            for a, b in self.ties:
                for p in self.boundaries(a) ^ self.boundaries(b):
                    changed |= self.cut(a, p) | self.cut(b, p)
            for path, given, space, groups in self.grouped:
                whole = _Channels(((space, 0, self.space_sizes[space]),), 1)
                per_in, per_out = given.size // groups, self.space_sizes[space] // groups
                for p in self.boundaries(given):
                    if p % per_in:
                        errors[path] = f'a concatenation or split at channel {p} falls inside one of its groups'
                    else:
                        changed |= self.cut(whole, p // per_in * per_out)
                for p in sorted(self.cuts[space]):
                    if p % per_out:
                        errors[path] = f'a concatenation or split at channel {p} falls inside one of its groups'
                    else:
                        changed |= self.cut(given, p // per_out * per_in)
        return errors

    def sizes(self, c: Optional[_Channels]) -> Sizes:
        return None if c is None else tuple(b - a for _, a, b in self.pieces(c))


def trace_channel_spaces(model: nn.Module, x: torch.Tensor) -> ChannelSpaces:
    """The segments of every module's input and output in ``model`` (see the module docstring),
    from one eval-mode forward of ``x``. A forward the tracing breaks on gives no segments at all
    (every activation one segment: the global copy-major layout), with a warning."""
    tracer = _Tracer()
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        for path, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(tracer.pre_hook(path, m)))
            handles.append(m.register_forward_hook(tracer.post_hook(path, m)))
        model.eval()
        with torch.no_grad(), tracer:
            model(x)
    except Exception as e:
        tracer.failure = tracer.failure or f'{type(e).__name__}: {e}'
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if tracer.failure is not None:
        warnings.warn(f'Channel segments of {type(model).__name__} not traced ({tracer.failure}): '
                      'every activation is laid out as one block')
        return ChannelSpaces()
    errors = tracer.settle()
    io = {path: (tracer.sizes(i), tracer.sizes(o)) for path, (i, o) in tracer.io.items() if '\0' not in path}
    calls = {path: [tracer.sizes(c) for c in given] for path, given in tracer.calls.items()}
    return ChannelSpaces(io, errors, calls)
