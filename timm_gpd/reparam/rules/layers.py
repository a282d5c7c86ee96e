"""Rules of torch's and timm's building blocks: convs, linears, norms, attention, layer scale."""
import torch.nn as nn

from ..branches import CBRConv2d
from ..expansion import COPY, MIX, ChannelMap
from ._registry import ModulePlan, RuleContext, follows_segments, per_channel, plan_of, register_rule, timm_types


def _grouped_maps(ctx: RuleContext, in_map: ChannelMap, out_map: ChannelMap, groups: int) -> int:
    """DT group count of a grouped op; each DT group must copy exactly one student group."""
    in_per_group = in_map.size // groups
    out_per_group = out_map.size // groups
    wide_groups = in_map.wide_size // in_per_group
    if (in_map.wide_size % in_per_group or out_map.wide_size % out_per_group
            or out_map.wide_size // out_per_group != wide_groups):
        raise ValueError(
            f'{ctx.path}: grouped conv ({groups} groups of {in_per_group} -> {out_per_group} channels) '
            f'cannot be widened to {in_map.wide_size} -> {out_map.wide_size} channels with whole groups; '
            f'the widths chosen for ratio {ctx.ratio} do not give both sides the same number of groups.')
    if len(in_map.sizes) > 1 or len(out_map.sizes) > 1:
        # segments laid out copy-major each (a concatenation): every segment must hold whole groups,
        # in the student and in the DT, the same number on both sides
        pairs = list(zip(in_map.sizes, in_map.wide, out_map.sizes, out_map.wide))
        if len(in_map.sizes) != len(out_map.sizes) or any(
                si % in_per_group or wi % in_per_group or so % out_per_group or wo % out_per_group
                or si // in_per_group != so // out_per_group or wi // in_per_group != wo // out_per_group
                for si, wi, so, wo in pairs):
            raise NotImplementedError(
                f'{ctx.path}: grouped conv over concatenated segments {in_map.sizes} -> {out_map.sizes} '
                f'(widened to {in_map.wide} -> {out_map.wide}) that do not hold whole groups of '
                f'{in_per_group} -> {out_per_group} channels')
    return wide_groups


def kernel_plans(ctx: RuleContext, in_channels: int, out_channels: int, groups: int):
    """Plans shared by every [out, in/groups, ...] kernel of a conv, and its new group count."""
    in_map, out_map = ctx.input_map(in_channels), ctx.output_map(out_channels)
    if groups == 1:
        return plan_of((0, out_map, COPY), (1, in_map, MIX)), in_map, out_map, 1
    # each output of a grouped conv sees one copy of its inputs: rows are copied unscaled
    wide_groups = _grouped_maps(ctx, in_map, out_map, groups)
    return plan_of((0, out_map, COPY)), in_map, out_map, wide_groups


@register_rule(nn.Conv2d, nn.Conv1d, *timm_types('timm.layers', 'Conv2dSame'))
@follows_segments
def conv_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    plan = ModulePlan(
        tensors={'weight': kernel},
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


@register_rule(CBRConv2d)
@follows_segments
def cbr_rule(m: CBRConv2d, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    # the 1x1 mixer maps the input channels onto themselves: a conv with in == out
    mixer, *_ = kernel_plans(
        ctx.but(expand_out=ctx.expand_in, out_sizes=ctx.in_sizes), m.in_channels, m.in_channels, m.groups)
    plan = ModulePlan(
        tensors={
            'weight': kernel, 'w_avg': kernel, 'w_prior': kernel, 'w_kxk': kernel, 'w_pw': kernel,
            'mixer': mixer, 'mixer_identity': mixer,
            'w_dw': plan_of((0, in_map, COPY)),
            'scales': plan_of((1, out_map, COPY)),
        },
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


# timm's Linear is nn.Linear with a TorchScript dtype cast (MobileNetV3 head)
@register_rule(nn.Linear, *timm_types('timm.layers', 'Linear'))
@follows_segments
def linear_rule(m: nn.Linear, ctx: RuleContext) -> ModulePlan:
    in_map, out_map = ctx.input_map(m.in_features), ctx.output_map(m.out_features)
    plan = ModulePlan(
        tensors={'weight': plan_of((0, out_map, COPY), (1, in_map, MIX))},
        attrs={'in_features': in_map.wide_size, 'out_features': out_map.wide_size})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


@register_rule(
    nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm,
    *timm_types('timm.layers.norm_act', 'BatchNormAct2d', 'SyncBatchNormAct'))
@follows_segments
def batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, ctx: RuleContext) -> ModulePlan:
    # per-channel statistics of replicas are the replicas' statistics: any ratio is exact
    cmap = ctx.per_channel_map(m.num_features)
    return ModulePlan(
        tensors=per_channel(m, cmap, ('weight', 'bias', 'running_mean', 'running_var')),
        attrs={'num_features': cmap.wide_size})


@register_rule(
    nn.LayerNorm, nn.RMSNorm,
    *timm_types('timm.layers.norm', 'LayerNorm', 'LayerNorm2d', 'RmsNorm', 'RmsNorm2d', 'SimpleNorm', 'SimpleNorm2d',
                'LayerNormFp32', 'LayerNorm2dFp32', 'RmsNormFp32', 'RmsNorm2dFp32', 'SimpleNormFp32', 'SimpleNorm2dFp32'),
    *timm_types('timm.layers.norm_act', 'LayerNormAct', 'LayerNormAct2d', 'RmsNormAct', 'RmsNormAct2d'))
@follows_segments
def layernorm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise NotImplementedError(
            f'{ctx.path} ({type(m).__name__}) normalizes over {shape}; only a channel dimension is supported')
    # over a concatenation too: with every channel copied equally often, the mean and variance
    # over the DT's channels are the student's, whatever the order
    cmap = ctx.per_channel_map(shape[0])
    ctx.require_uniform(cmap, type(m).__name__)
    return ModulePlan(tensors=per_channel(m, cmap, ('weight', 'bias')), attrs={'normalized_shape': (cmap.wide_size,)})


# GroupNorm1 (one group, PoolFormer / MetaFormer): r groups of replicas have the student's statistics
@register_rule(
    nn.GroupNorm, *timm_types('timm.layers.norm', 'GroupNorm', 'GroupNorm1'),
    *timm_types('timm.layers.norm_act', 'GroupNormAct', 'GroupNorm1Act'))
def groupnorm_rule(m: nn.GroupNorm, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.channels(m.num_channels)
    ctx.require_uniform(cmap, 'GroupNorm')
    copies = cmap.wide_size // cmap.size
    return ModulePlan(
        tensors=per_channel(m, cmap, ('weight', 'bias')),
        attrs={'num_channels': cmap.wide_size, 'num_groups': m.num_groups * copies})


@register_rule(*timm_types('timm.layers.grn', 'GlobalResponseNorm'))
def global_response_norm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ConvNeXt-V2 GRN divides by the mean response over channels, which the replicas keep
    only when every channel has the same number of copies."""
    cmap = ctx.channels(m.weight.shape[0])
    ctx.require_uniform(cmap, 'GlobalResponseNorm')
    return ModulePlan(tensors=per_channel(m, cmap, ('weight', 'bias')))


def head_maps(ctx: RuleContext, num_heads: int, head_dim: int):
    """Maps of an attention's channels (``num_heads * head_dim``) and of its heads.

    Heads widen x r with head_dim (so the softmax scale) unchanged: with copy-major channels DT
    head h is a copy of student head ``h % num_heads``, so per-head tensors (relative position
    bias tables, logit scales) are copied along the head dimension the same way.
    """
    attn_map = ctx.channels(num_heads * head_dim)
    if attn_map.wide_size % head_dim:
        raise ValueError(
            f'{ctx.path}: ratio {ctx.ratio} widens {attn_map.size} attention channels to {attn_map.wide_size}, '
            f'not a whole number of heads of {head_dim}')
    return attn_map, ChannelMap((num_heads,), (attn_map.wide_size // head_dim,))


def attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """timm Attention: heads x r, head_dim (so the softmax scale) unchanged.

    With copy-major channels, DT head h is a copy of student head h % H, so its attention
    pattern and output are copies too. The fused qkv rows are three segments (q, k, v),
    each widened on its own.
    """
    if getattr(m, 'gate', None) is not None:
        raise NotImplementedError(f'{ctx.path} (gated {type(m).__name__}) is not supported yet')
    dim = m.qkv.in_features
    attn_dim = m.num_heads * m.head_dim
    qkv_map = ChannelMap.segmented(attn_dim, 3, ctx.ratio)
    wide_attn = qkv_map.wide[0]
    if wide_attn % m.head_dim:
        raise ValueError(
            f'{ctx.path}: ratio {ctx.ratio} widens {attn_dim} attention channels to {wide_attn}, '
            f'not a whole number of heads of {m.head_dim}')
    in_map = ctx.channels(dim)
    plan = ModulePlan(
        tensors={'qkv.weight': plan_of((0, qkv_map, COPY), (1, in_map, MIX))},
        attrs={'num_heads': wide_attn // m.head_dim, 'qkv.in_features': in_map.wide_size,
               'qkv.out_features': qkv_map.wide_size},
        handled={'qkv', 'q_norm', 'k_norm'})  # q/k norms act on head_dim, which is unchanged
    if hasattr(m, 'attn_dim'):
        plan.attrs['attn_dim'] = wide_attn
    if m.qkv.bias is not None:
        plan.tensors['qkv.bias'] = plan_of((0, qkv_map, COPY))
    return plan


register_rule(*timm_types('timm.layers', 'Attention'), *timm_types('timm.models.vision_transformer', 'Attention'))(
    attention_rule)


@register_rule(
    *timm_types('timm.layers', 'LayerScale', 'LayerScale2d'),
    *timm_types('timm.models.vision_transformer', 'LayerScale'))
@follows_segments
def layer_scale_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.per_channel_map(m.gamma.shape[0])
    return ModulePlan(tensors={'gamma': plan_of((0, cmap, COPY))})


@register_rule(*timm_types('timm.layers.std_conv', 'ScaledStdConv2d', 'ScaledStdConv2dSame', 'StdConv2d', 'StdConv2dSame'))
@follows_segments
def std_conv_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Weight-standardized convs (NFNet, BiT): the kernel is standardized per output row over its
    fan-in F before the conv (ScaledStdConv2d also multiplies by gain * gamma / sqrt(F)).

    A DT row holds r replicas of each student column divided by r: its mean is the student's / r
    and its (biased) variance the student's / r^2, over r F entries. With eps / r^2 the
    standardized DT row is the standardized student row, and a fan-in scale of ``scale / r``
    (not gamma / sqrt(r F)) makes the r copies of each column add up to the student's column.
    That needs every input channel to have r copies, and no symmetry noise on the kernel (it
    would change the row variance); the copies still diverge in training, through the other
    layers' noise. A grouped kernel's rows keep their fan-in: nothing changes but the widths.
    """
    plan = conv_rule(m, ctx)
    in_map = ctx.input_map(m.in_channels)
    if m.groups == 1 and in_map.expanded:
        if not hasattr(m, 'scale'):  # plain StdConv2d: unit-variance rows, no scale to spread over the copies
            raise NotImplementedError(
                f'{ctx.path} ({type(m).__name__}) standardizes each kernel row to unit variance with no scale '
                'to divide among the copies of an input channel')
        ctx.require_uniform(in_map, f'{type(m).__name__} weight standardization')
        copies = in_map.wide_size // in_map.size
        plan.attrs['eps'] = m.eps / copies ** 2
        plan.attrs['scale'] = m.scale / copies
        plan.noiseless.add('weight')
    if hasattr(m, 'gain'):
        plan.tensors['gain'] = plan_of((0, ctx.output_map(m.out_channels), COPY))
    return plan


def _fused_projection(m: nn.Module, name: str, segments: int, attn_map: ChannelMap, ctx: RuleContext,
                      plan: ModulePlan):
    """A Linear or 1x1 conv whose output rows are ``segments`` parts (q, k, v) of the attention
    channels: each part widened on its own."""
    proj = getattr(m, name)
    conv = isinstance(proj, nn.Conv2d)
    n_in = proj.in_channels if conv else proj.in_features
    if conv and proj.groups != 1:
        raise NotImplementedError(f'{ctx.path}.{name}: grouped fused projection')
    rows = ChannelMap((attn_map.size,) * segments, (attn_map.wide_size,) * segments)
    in_map = ctx.channels(n_in)
    plan.tensors[f'{name}.weight'] = plan_of((0, rows, COPY), (1, in_map, MIX))
    if proj.bias is not None:
        plan.tensors[f'{name}.bias'] = plan_of((0, rows, COPY))
    keys = ('in_channels', 'out_channels') if conv else ('in_features', 'out_features')
    plan.attrs.update({f'{name}.{keys[0]}': in_map.wide_size, f'{name}.{keys[1]}': rows.wide_size})
    plan.handled.add(name)


_FUSED = (('qkv', 3), ('qk', 2), ('kv', 2))  # fused projections and their segment counts
_SEPARATE_Q = ('q_proj', 'q', 'wq')


def _out_width(proj: nn.Module) -> int:
    return proj.out_channels if isinstance(proj, nn.Conv2d) else proj.out_features


def multi_head_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Multi-head self-attention in the timm style, whatever the model family.

    ``num_heads`` widens x r, ``head_dim`` stays (the softmax scale too). Fused projections
    (``qkv``, ``qk``, ``kv``; Linear or 1x1 conv) have one row segment per part, each widened
    on its own; separate q / k / v Linears are widened by the Linear rule. Vectors over the
    attention channels (``q_bias``, ``k_bias``, ``v_bias``) are copied, and so are per-head
    tensors: a relative position bias table [positions, heads] along its last dim, a
    ``logit_scale`` / ``temperature`` [heads, 1, 1] along its first. q/k norms and relative
    position tables over head_dim do not change.
    """
    if getattr(m, 'gate', None) is not None:
        raise NotImplementedError(f'{ctx.path} (gated {type(m).__name__}) is not supported yet')
    heads = m.num_heads
    fused = [(n, k) for n, k in _FUSED if isinstance(getattr(m, n, None), (nn.Linear, nn.Conv2d))]
    if getattr(m, 'use_global', False):  # GCViT's global blocks: the query comes from outside, qkv holds k, v
        fused = [(n, 2 if n == 'qkv' else k) for n, k in fused]
    if fused:
        attn_dim = _out_width(getattr(m, fused[0][0])) // fused[0][1]
    else:
        q = next((getattr(m, n) for n in _SEPARATE_Q if isinstance(getattr(m, n, None), nn.Linear)), None)
        if q is None:
            raise NotImplementedError(f'{ctx.path} ({type(m).__name__}): no q / qkv projection found')
        attn_dim = q.out_features
    head_dim = getattr(m, 'head_dim', None) or attn_dim // heads
    attn_map, head_map = head_maps(ctx, heads, head_dim)
    plan = ModulePlan(attrs={'num_heads': head_map.wide_size}, handled={'q_norm', 'k_norm'})
    for name, segments in fused:
        if _out_width(getattr(m, name)) != segments * attn_dim:
            raise NotImplementedError(f'{ctx.path}.{name}: {segments} parts of unequal widths')
        _fused_projection(m, name, segments, attn_map, ctx, plan)
    for name in ('q_bias', 'k_bias', 'v_bias'):
        if getattr(m, name, None) is not None:
            plan.tensors[name] = plan_of((0, attn_map, COPY))
    table = getattr(m, 'relative_position_bias_table', None)
    if table is not None:
        if table.shape[-1] != heads:
            raise NotImplementedError(f'{ctx.path}: relative position table of shape {tuple(table.shape)}')
        plan.tensors['relative_position_bias_table'] = plan_of((table.ndim - 1, head_map, COPY))
    for name in ('logit_scale', 'temperature'):
        t = getattr(m, name, None)
        if isinstance(t, nn.Parameter) and t.shape[0] == heads:
            plan.tensors[name] = plan_of((0, head_map, COPY))
    for attr in ('attn_dim', 'all_head_dim'):
        if getattr(m, attr, None) == attn_dim:
            plan.attrs[attr] = attn_map.wide_size
    return plan


def channel_vectors(*names, dim: int = -1):
    """A rule for a module whose own tensors ``names`` are channel vectors along ``dim`` (class
    tokens, position embeddings, layer scales): copied. A name may be a ``(name, dim)`` pair.
    Absent or None tensors are skipped; the module's children are visited as usual. A vector over
    the channels of the module's output (or input) takes their segments (a layer scale on a block
    whose channels are concatenated)."""
    def rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
        plan = ModulePlan()
        for entry in names:
            name, axis = entry if isinstance(entry, tuple) else (entry, dim)
            t = getattr(m, name, None)
            if isinstance(t, nn.Parameter) or (t is not None and name in m._buffers):
                d = axis % t.ndim
                n = t.shape[d]
                sizes = next((s for s in (ctx.out_sizes, ctx.in_sizes) if s and sum(s) == n), None)
                plan.tensors[name] = plan_of((d, ctx.channels(n, sizes=sizes), COPY))
        return plan
    return follows_segments(rule)


@register_rule(*timm_types('timm.layers.mlp', 'GluMlp'))
def glu_mlp_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Gated MLP: ``fc1``'s output is chunked into two halves (value and gate), so its rows are
    two segments, each widened on its own; ``norm`` and ``fc2`` see one half, widened as usual."""
    fc1 = m.fc1
    conv = isinstance(fc1, nn.Conv2d)
    n_in, n_out = (fc1.in_channels, fc1.out_channels) if conv else (fc1.in_features, fc1.out_features)
    if conv and fc1.groups != 1:
        raise NotImplementedError(f'{ctx.path} ({type(m).__name__}): grouped fc1')
    halves = ChannelMap.segmented(n_out // 2, 2, ctx.ratio)
    in_map = ctx.input_map(n_in)
    plan = ModulePlan(tensors={'fc1.weight': plan_of((0, halves, COPY), (1, in_map, MIX))}, handled={'fc1'})
    if fc1.bias is not None:
        plan.tensors['fc1.bias'] = plan_of((0, halves, COPY))
    names = ('in_channels', 'out_channels') if conv else ('in_features', 'out_features')
    plan.attrs.update({f'fc1.{names[0]}': in_map.wide_size, f'fc1.{names[1]}': halves.wide_size})
    return plan


@register_rule(nn.ConvTranspose2d, nn.ConvTranspose1d)
def conv_transpose_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Transposed conv: the kernel is [in, out / groups, ...], inputs along dim 0."""
    if m.groups != 1:
        raise NotImplementedError(f'{ctx.path} (grouped {type(m).__name__}) is not supported yet')
    in_map, out_map = ctx.input_map(m.in_channels), ctx.output_map(m.out_channels)
    plan = ModulePlan(tensors={'weight': plan_of((0, in_map, MIX), (1, out_map, COPY))},
                      attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


@register_rule(*timm_types('timm.layers.blur_pool', 'BlurPool2d'))
def blur_pool_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """A fixed depthwise blur: one filter per channel (or one shared filter when ``channels`` is None)."""
    if m.channels is None:
        return ModulePlan()
    cmap = ctx.channels(m.channels)
    return ModulePlan(tensors={'filt': plan_of((0, cmap, COPY))}, attrs={'channels': cmap.wide_size})
