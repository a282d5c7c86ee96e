"""ReXNet: a block's shortcut is added to the first ``in_channels`` of its wider output."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.rexnet', 'LinearBottleneck'))
@follows_segments
def linear_bottleneck_rule(m, ctx: RuleContext) -> ModulePlan:
    """``cat([x[:, :in_channels] + shortcut, x[:, in_channels:]])``: the channel tracing cuts the
    output there; the DT slices at that segment's width."""
    out = ctx.output_map(m.out_channels)
    plan = ModulePlan(attrs={'out_channels': out.wide_size})
    if m.use_shortcut:
        plan.attrs['in_channels'] = ctx.wide_position(out, m.in_channels, 'adds its shortcut to the channels')
    else:
        plan.attrs['in_channels'] = ctx.input_map(m.in_channels).wide_size
    return plan
