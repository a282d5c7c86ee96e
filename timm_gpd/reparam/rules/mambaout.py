"""MambaOut: a gated conv block splits its hidden channels into gate, identity and conv parts."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.mambaout', 'GatedConvBlock'))
@follows_segments
def gated_conv_block_rule(m, ctx: RuleContext) -> ModulePlan:
    """``torch.split(fc1(x), split_indices, dim=-1)``: the DT splits ``fc1``'s output at the
    widths of the traced parts."""
    fc1 = f'{ctx.path}.fc1' if ctx.path else 'fc1'
    parts = ctx.wide_parts(ctx.traced_map(fc1, m.fc1.out_features), m.split_indices, 'splits its hidden channels')
    return ModulePlan(attrs={'split_indices': parts})
