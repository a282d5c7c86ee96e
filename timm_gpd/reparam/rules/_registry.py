"""The rule registry: what a rule receives (:class:`RuleContext`) and returns (:class:`ModulePlan`).

A rule is registered for an exact module type (a subclass may change what the
parameters mean, e.g. weight-standardized convs, so it must be registered itself).
Given the module and whether its input / output channels are expanded (the stem sees
the image, the classifier emits logits), a rule returns a :class:`ModulePlan`: a
:class:`TensorPlan` per tensor, the attributes that change (``out_channels``,
``num_heads``...) and the children it handled itself. Modules without a rule and
without tensors of their own are containers: their children are visited. Anything
else is unsupported and raises ``NotImplementedError`` naming its path and type.
"""
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Type

import torch.nn as nn

from ..expansion import COPY, ChannelMap, TensorPlan, widened_size


@dataclass
class RuleContext:
    path: str
    ratio: float
    expand_in: bool = True
    expand_out: bool = True
    # DT width of each student channel count, shared by every rule of one model: fixed in advance
    # where grouped convs need whole groups, filled with ``widened_size`` as counts are met
    widths: Dict[int, int] = field(default_factory=dict)
    # segment sizes of the module's input / output where a concatenation or split by count lays
    # their channels out in several copy-major segments (``spaces.trace_channel_spaces``), and
    # those of every module of the model, by path (rules of blocks read their children's)
    in_sizes: Optional[Tuple[int, ...]] = None
    out_sizes: Optional[Tuple[int, ...]] = None
    spaces: Dict[str, Tuple[Optional[Tuple[int, ...]], Optional[Tuple[int, ...]]]] = field(default_factory=dict)

    def width(self, n: int) -> int:
        return self.widths.setdefault(n, widened_size(n, self.ratio))

    def channels(self, n: int, expand: bool = True, sizes: Optional[Sequence[int]] = None) -> ChannelMap:
        """How ``n`` channels widen: one copy-major segment, or the segments ``sizes`` (when they
        are several and add up to ``n``), each copy-major on its own."""
        if not expand:
            return ChannelMap.identity(n)
        if sizes is not None and len(sizes) > 1 and sum(sizes) == n:
            cmap = ChannelMap(tuple(sizes), tuple(self.width(s) for s in sizes))
        else:
            cmap = ChannelMap((n,), (self.width(n),))
        if not cmap.expanded:
            raise ValueError(
                f'gpd_ratio {self.ratio} adds no channel to {self.path} ({n} channels); use a larger ratio')
        return cmap

    def heads(self, n: int) -> ChannelMap:
        """How ``n`` attention heads widen: copied whole, so the ratio must give a multiple of n.
        Not a channel count: not recorded in ``widths``."""
        cmap = ChannelMap((n,), (widened_size(n, self.ratio),))
        if cmap.wide_size % n or not cmap.expanded:
            raise ValueError(f'{self.path}: heads are copied whole: use an integer gpd_ratio for this model '
                             f'(ratio {self.ratio} gives {n} -> {cmap.wide_size} heads)')
        return cmap

    def but(self, **changes) -> 'RuleContext':
        """The same context (same shared widths) with some fields changed."""
        return dataclasses.replace(self, **changes)

    def input_map(self, n: int) -> ChannelMap:
        return self.channels(n, self.expand_in, self.in_sizes)

    def output_map(self, n: int) -> ChannelMap:
        return self.channels(n, self.expand_out, self.out_sizes)

    def per_channel_map(self, n: int) -> ChannelMap:
        """The channels of a per-channel module (a norm): its input's segments."""
        return self.channels(n, True, self.in_sizes or self.out_sizes)

    def wide_position(self, cmap: ChannelMap, position: int, what: str) -> int:
        """The DT position of student channel boundary ``position`` of ``cmap`` (a split point):
        it must fall between two segments."""
        offset = wide = 0
        for s, w in zip(cmap.sizes, cmap.wide):
            if offset == position:
                return wide
            offset, wide = offset + s, wide + w
        if offset == position:
            return wide
        raise NotImplementedError(
            f'{self.path} {what} at channel {position}, inside one of its segments {cmap.sizes}: '
            'the dynamic teacher cannot split there')

    def wide_parts(self, cmap: ChannelMap, parts: Sequence[int], what: str) -> Tuple[int, ...]:
        """DT sizes of consecutive student parts of ``cmap`` (the counts a split by count uses)."""
        bounds, total = [0], 0
        for p in parts:
            total += p
            bounds.append(self.wide_position(cmap, total, what))
        return tuple(b - a for a, b in zip(bounds, bounds[1:]))

    def traced_map(self, path: str, n: int, output: bool = True) -> ChannelMap:
        """The channels of module ``path``'s output (or input) as traced: segments where a
        split or concatenation cuts them."""
        sizes = self.spaces.get(path, (None, None))[1 if output else 0]
        return self.channels(n, sizes=sizes)

    def require_uniform(self, cmap: ChannelMap, what: str):
        if not cmap.uniform:
            raise ValueError(
                f'{self.path} ({what}) normalizes over channels, which stays exact only when every '
                f'channel has the same number of copies: ratio {self.ratio} gives {cmap.size} -> '
                f'{cmap.wide_size} channels. Use an integer gpd_ratio for this model.')


@dataclass
class ModulePlan:
    tensors: Dict[str, TensorPlan] = field(default_factory=dict)  # local dotted name -> plan
    attrs: Dict[str, object] = field(default_factory=dict)  # local dotted 'child.attr' -> value
    handled: Set[str] = field(default_factory=set)  # child names not to visit
    # tensors that must stay exact replicas (no symmetry noise): their module normalizes them
    # (weight standardization), so noise that cancels in a plain conv would change the function
    noiseless: Set[str] = field(default_factory=set)


Rule = Callable[[nn.Module, RuleContext], ModulePlan]
_RULES: Dict[Type[nn.Module], Rule] = {}
# rules that lay channels out in the segments the context gives (RuleContext.in_sizes / out_sizes)
_SEGMENT_AWARE: Set[Rule] = set()
_UNSUPPORTED: Dict[Type[nn.Module], str] = {nn.ChannelShuffle: 'permutes channels'}


def register_rule(*types: Type[nn.Module]):
    def wrap(fn: Rule) -> Rule:
        for t in types:
            _RULES[t] = fn
        return fn
    return wrap


def follows_segments(fn: Rule) -> Rule:
    """Mark a rule as laying its tensors out in the segments of its context: a module whose
    input or output is several segments (a concatenation, a split by count) is refused when its
    rule is not marked."""
    _SEGMENT_AWARE.add(fn)
    return fn


def reads_segments(rule: Optional[Rule]) -> bool:
    return rule in _SEGMENT_AWARE


def register_unsupported(module_type: Type[nn.Module], reason: str):
    _UNSUPPORTED[module_type] = reason


def get_rule(module: nn.Module) -> Optional[Rule]:
    return _RULES.get(type(module))


def unsupported_reason(module: nn.Module) -> Optional[str]:
    return _UNSUPPORTED.get(type(module))


def timm_types(module_name: str, *names: str) -> Tuple[Type[nn.Module], ...]:
    """The classes of a timm module that exist in the installed timm (names move between versions)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return ()
    found = []
    for name in names:
        t = getattr(module, name, None)
        if isinstance(t, type) and t not in found:
            found.append(t)
    return tuple(found)


def plan_of(*dims: Tuple[int, ChannelMap, str]) -> TensorPlan:
    """A tensor plan of the dims that widen (identity maps are dropped)."""
    return TensorPlan(tuple(d for d in dims if d[1].expanded))


def per_channel(m: nn.Module, cmap: ChannelMap, names: Sequence[str], dim: int = 0) -> Dict[str, TensorPlan]:
    """Plans of the per-channel vectors among ``names`` that ``m`` has (None entries skipped)."""
    plan = plan_of((dim, cmap, COPY))
    return {n: plan for n in names if getattr(m, n, None) is not None}


def channel_vector(t, cmap: ChannelMap) -> TensorPlan:
    """A tensor whose last dim is the channels (tokens, layer scales, position embeddings)."""
    return plan_of((t.ndim - 1, cmap, COPY))
