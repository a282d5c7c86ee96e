"""MixNet's MixedConv2d: the channels are split into fixed-size groups, one kernel size each."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.layers.mixed_conv2d', 'MixedConv2d'))
@follows_segments
def mixed_conv_rule(m, ctx: RuleContext) -> ModulePlan:
    """``torch.split(x, self.splits, 1)``: the channel tracing cuts the input at the splits; the
    DT splits at their widths. The per-split convs widen by the conv rule."""
    in_map = ctx.input_map(m.in_channels)
    splits = ctx.wide_parts(in_map, m.splits, 'splits its channels')
    return ModulePlan(attrs={'splits': list(splits), 'in_channels': in_map.wide_size,
                             'out_channels': ctx.output_map(m.out_channels).wide_size})
