"""SHViT: single-head self-attention on the first ``pdim`` channels, the rest passed through."""
from ..expansion import COPY, MIX, ChannelMap
from ._registry import ModulePlan, RuleContext, follows_segments, per_channel, plan_of, register_rule, timm_types


@register_rule(*timm_types('timm.models.shvit', 'SHSA'))
@follows_segments
def single_head_attention_rule(m, ctx: RuleContext) -> ModulePlan:
    """One head cannot be copied: its queries and keys (``qk_dim`` rows of ``qkv`` each) keep their
    width, so the logits and their scale are the student's, and only the values and the passed-
    through channels widen. The input is split at ``pdim`` (cut there by the channel tracing);
    ``proj`` reads [attention output, passed-through part], which the tracing cannot see through
    the attention's reshapes, so this rule gives its segments."""
    x = ctx.input_map(m.dim)
    pdim, rest = ctx.wide_parts(x, (m.pdim, m.dim - m.pdim), 'splits its channels')
    part = ctx.channels(m.pdim)
    if part.wide_size != pdim:
        raise NotImplementedError(f'{ctx.path} ({type(m).__name__}): its attention part is not one segment')
    rows = ChannelMap((m.qk_dim, m.qk_dim, m.pdim), (m.qk_dim, m.qk_dim, pdim))
    plan = ModulePlan(
        tensors={'qkv.c.weight': plan_of((0, rows, COPY), (1, part, MIX)),
                 **{f'qkv.bn.{k}': v for k, v in per_channel(m.qkv.bn, rows, ('weight', 'bias', 'running_mean',
                                                                            'running_var')).items()}},
        attrs={'pdim': pdim, 'dim': x.wide_size, 'qkv.c.in_channels': pdim, 'qkv.c.out_channels': rows.wide_size,
               'qkv.bn.num_features': rows.wide_size},
        handled={'qkv'})
    if m.qkv.c.bias is not None:
        plan.tensors['qkv.c.bias'] = plan_of((0, rows, COPY))
    proj = f'{ctx.path}.proj.1.c' if ctx.path else 'proj.1.c'
    passed, offset = [], 0  # the passed-through part's own segments, as traced
    for s in (ctx.in_sizes if ctx.in_sizes and sum(ctx.in_sizes) == m.dim else (m.pdim, m.dim - m.pdim)):
        if offset >= m.pdim:
            passed.append(s)
        offset += s
    ctx.spaces[proj] = ((m.pdim, *passed), ctx.spaces.get(proj, (None, None))[1])
    return plan
