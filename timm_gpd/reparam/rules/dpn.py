"""DPN: a dual path block adds the first ``num_1x1_c`` channels (residual path) and concatenates
the rest (dense path)."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.dpn', 'DualPathBlock'))
@follows_segments
def dual_path_rule(m, ctx: RuleContext) -> ModulePlan:
    """The block's output is [residual, dense so far, new dense]: the DT slices its projections
    at the width of the residual part (the channel tracing cuts every space there)."""
    if not ctx.out_sizes:
        raise NotImplementedError(f'{ctx.path} ({type(m).__name__}): its output channels were not traced')
    out = ctx.channels(sum(ctx.out_sizes), sizes=ctx.out_sizes)
    return ModulePlan(attrs={'num_1x1_c': ctx.wide_position(out, m.num_1x1_c, 'splits its residual path')})
