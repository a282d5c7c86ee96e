"""InceptionNeXt: the token mixer splits its channels into an identity part and three depthwise
conv branches of fixed sizes."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.inception_next', 'InceptionDWConv2d'))
@follows_segments
def inception_dw_conv_rule(m, ctx: RuleContext) -> ModulePlan:
    """``torch.split(x, self.split_indexes, dim=1)``, cut there by the channel tracing: the DT
    splits at the parts' widths."""
    n = sum(m.split_indexes)
    return ModulePlan(attrs={'split_indexes': ctx.wide_parts(ctx.input_map(n), m.split_indexes, 'splits its channels')})
