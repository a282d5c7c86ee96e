"""CSPNet / CSPDarkNet: a cross stage splits its expanded features in two halves by count, runs
its blocks on one and concatenates them back."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.cspnet', 'CrossStage', 'CrossStage3'))
@follows_segments
def cross_stage_rule(m, ctx: RuleContext) -> ModulePlan:
    """``x.split(expand_chs // 2)``: the channel tracing cuts ``conv_exp``'s output in two
    segments there; the DT splits at the width of the first, and both halves must be equal."""
    path = f'{ctx.path}.conv_exp' if ctx.path else 'conv_exp'
    expanded = ctx.channels(m.expand_chs, sizes=ctx.spaces.get(path, (None, None))[1])
    first = ctx.wide_position(expanded, m.expand_chs // 2, f'splits its {m.expand_chs} expanded channels')
    if 2 * first != expanded.wide_size:
        raise NotImplementedError(
            f'{ctx.path} ({type(m).__name__}) splits {m.expand_chs} channels in halves, which ratio {ctx.ratio} '
            f'widens to {first} + {expanded.wide_size - first}: use an integer gpd_ratio for this model')
    return ModulePlan(attrs={'expand_chs': 2 * first})
