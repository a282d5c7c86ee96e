"""FocalNet: the focal modulation's projection ``f`` emits query, context and one gate per focal
level (plus a global one), split by count."""
from ..expansion import COPY, MIX, ChannelMap
from ._registry import ModulePlan, RuleContext, follows_segments, plan_of, register_rule, timm_types


@register_rule(*timm_types('timm.models.focalnet', 'FocalModulation'))
@follows_segments
def focal_modulation_rule(m, ctx: RuleContext) -> ModulePlan:
    """``f``'s rows are three segments: query and context widen, the ``focal_level + 1`` gates do
    not (each gate is one channel that weighs a whole level, ``gates[:, l:l + 1]``: copies of it
    would be read as other levels' gates). The DT splits at the widened sizes."""
    gates = m.focal_level + 1
    in_map, part = ctx.input_map(m.dim), ctx.channels(m.dim)
    rows = ChannelMap((m.dim, m.dim, gates), (part.wide_size, part.wide_size, gates))
    plan = ModulePlan(
        tensors={'f.weight': plan_of((0, rows, COPY), (1, in_map, MIX))},
        attrs={'f.in_channels': in_map.wide_size, 'f.out_channels': rows.wide_size,
               'input_split': [part.wide_size, part.wide_size, gates], 'dim': part.wide_size},
        handled={'f'})
    if m.f.bias is not None:
        plan.tensors['f.bias'] = plan_of((0, rows, COPY))
    return plan
