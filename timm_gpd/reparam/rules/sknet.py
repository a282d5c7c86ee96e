"""SKNet's selective kernel conv: kernel paths over (optionally split) input channels, stacked
and weighed by a softmax across the paths."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.layers.selective_kernel', 'SelectiveKernel'))
@follows_segments
def selective_kernel_rule(m, ctx: RuleContext) -> ModulePlan:
    """With ``split_input`` the input is split into ``num_paths`` equal parts by count (cut there
    by the channel tracing): the DT's ``in_channels`` is the paths' widths. The attention's
    ``fc_select`` rows are one part per path, which the tracing cuts where its output is viewed
    as [B, paths, C, 1, 1]; the paths' outputs are stacked, so they share one layout."""
    in_map = ctx.input_map(m.in_channels)
    if m.split_input:
        parts = ctx.wide_parts(in_map, [m.in_channels // m.num_paths] * m.num_paths, 'splits its input into paths')
        if len(set(parts)) != 1:
            raise NotImplementedError(f'{ctx.path} ({type(m).__name__}) splits {m.in_channels} channels into '
                                      f'{m.num_paths} paths, which ratio {ctx.ratio} widens unequally {parts}')
    return ModulePlan(attrs={'in_channels': in_map.wide_size, 'out_channels': ctx.output_map(m.out_channels).wide_size})
