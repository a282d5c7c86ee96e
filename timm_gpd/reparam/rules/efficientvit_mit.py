"""EfficientViT (MIT): lightweight multi-scale linear attention (LiteMLA)."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.efficientvit_mit', 'LiteMLA'))
@follows_segments
def lite_mla_rule(m, ctx: RuleContext) -> ModulePlan:
    """q/k/v are laid out head-major ([q, k, v] of ``dim`` channels per head), so a copy-major
    widening of ``qkv`` and of its aggregated copies gives ``ratio`` times the heads, each a copy of
    a student head, with ``dim`` unchanged. The scales are concatenated, reshaped into heads and
    back: ``proj`` then reads one copy-major segment per scale, which the channel tracing cannot
    see through the reshapes, so this rule gives it."""
    total = m.qkv.conv.out_channels // 3
    scales = len(m.aggreg) + 1
    wide = ctx.width(total)
    if wide % m.dim:
        raise ValueError(f'{ctx.path}: heads are copied whole: use an integer gpd_ratio for this model '
                         f'(ratio {ctx.ratio} gives {total} -> {wide} attention channels, heads of {m.dim})')
    proj = f'{ctx.path}.proj.conv' if ctx.path else 'proj.conv'
    ctx.spaces[proj] = ((total,) * scales, ctx.spaces.get(proj, (None, None))[1])
    return ModulePlan()
