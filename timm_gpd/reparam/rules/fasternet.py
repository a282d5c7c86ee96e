"""FasterNet: a partial conv convolves the first ``dim_conv3`` channels and passes the rest."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.fasternet', 'Partial_conv3'))
@follows_segments
def partial_conv_rule(m, ctx: RuleContext) -> ModulePlan:
    """Split (or slice) at ``dim_conv3``, cut there by the channel tracing: the DT at its width."""
    n = m.dim_conv3 + m.dim_untouched
    conv, rest = ctx.wide_parts(ctx.input_map(n), (m.dim_conv3, m.dim_untouched), 'splits its channels')
    return ModulePlan(attrs={'dim_conv3': conv, 'dim_untouched': rest})
