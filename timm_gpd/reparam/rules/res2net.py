"""Res2Net (and DLA's Res2Net bottleneck): the bottleneck's features are split into ``scale``
parts of ``width`` channels, each part added to the previous part's output and convolved."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@follows_segments
def scale_split_rule(m, ctx: RuleContext) -> ModulePlan:
    """``torch.split(out, self.width, 1)`` of ``conv1``'s output: the channel tracing cuts it
    into parts of ``width``; the DT splits at the width of one part (all parts alike)."""
    conv1 = f'{ctx.path}.conv1' if ctx.path else 'conv1'
    total = m.conv1.out_channels
    parts = ctx.wide_parts(ctx.traced_map(conv1, total), [m.width] * (total // m.width), 'splits its scales')
    if len(set(parts)) != 1:
        raise NotImplementedError(f'{ctx.path} ({type(m).__name__}) splits {total} channels into parts of '
                                  f'{m.width}, which ratio {ctx.ratio} widens unequally {parts}')
    return ModulePlan(attrs={'width': parts[0]})


register_rule(*timm_types('timm.models.res2net', 'Bottle2neck'), *timm_types('timm.models.dla', 'DlaBottle2neck'))(
    scale_split_rule)
