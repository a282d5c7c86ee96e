"""Multi-head self-attention blocks of the ViT-like families that follow the timm pattern (a fused
``qkv`` or separate q / k / v Linears, ``num_heads``, head_dim unchanged, per-head tables): the
generic rule of :func:`~.layers.multi_head_attention_rule` widens them all. Each entry was
checked exact on the family's smallest model (``benchmarks/coverage.py``)."""
from ._registry import ModulePlan, register_rule, timm_types
from .layers import channel_vectors, conv_rule, multi_head_attention_rule

ATTENTIONS = (
    ('timm.models.metaformer', 'Attention'),
    ('timm.models.tnt', 'Attention'),
    ('timm.models.twins', 'GlobalSubSampleAttn'),
    ('timm.models.twins', 'LocallyGroupedAttn'),
    ('timm.models.davit', 'WindowAttention'),
    ('timm.models.davit', 'ChannelAttention'),
    ('timm.models.davit', 'ChannelAttentionV2'),
    ('timm.models.fastvit', 'Attention'),
    ('timm.models.vision_transformer_sam', 'Attention'),
    ('timm.models.volo', 'Attention'),
    ('timm.models.volo', 'ClassAttention'),
    ('timm.models.xcit', 'XCA'),
    ('timm.models.xcit', 'ClassAttn'),
    ('timm.models.edgenext', 'CrossCovarianceAttn'),
    ('timm.models.vision_transformer_relpos', 'RelPosAttention'),
    ('timm.models.visformer', 'Attention'),
)

for _module, _name in ATTENTIONS:
    register_rule(*timm_types(_module, _name))(multi_head_attention_rule)

# model-level tokens and position embeddings, and the blocks' layer scales, of the same families
register_rule(*timm_types('timm.models.tnt', 'TNT'))(channel_vectors('cls_token', 'patch_pos', ('pixel_pos', 1)))
register_rule(*timm_types('timm.models.volo', 'VOLO'))(channel_vectors('pos_embed', 'cls_token'))
register_rule(*timm_types('timm.models.xcit', 'Xcit'))(channel_vectors('cls_token'))
register_rule(*timm_types('timm.models.xcit', 'XCABlock', 'ClassAttentionBlock'))(
    channel_vectors('gamma1', 'gamma2', 'gamma3'))
register_rule(*timm_types('timm.models.visformer', 'Visformer'))(
    channel_vectors(('pos_embed1', 1), ('pos_embed2', 1), ('pos_embed3', 1)))
register_rule(*timm_types('timm.models.vision_transformer_sam', 'VisionTransformerSAM'))(channel_vectors('pos_embed'))
register_rule(*timm_types('timm.models.vision_transformer_relpos', 'VisionTransformerRelPos'))(
    channel_vectors('cls_token'))


@register_rule(*timm_types('timm.models.xcit', 'PositionalEncodingFourier'))
def fourier_position_rule(m, ctx):
    """XCiT: a 1x1 conv from fixed Fourier features of the positions (not widened) to the channels."""
    inner = ctx.but(path=f'{ctx.path}.token_projection', expand_in=False, expand_out=True)
    plan = conv_rule(m.token_projection, inner)
    out = ModulePlan(handled={'token_projection'}, attrs={'dim': ctx.channels(m.dim).wide_size})
    out.tensors = {f'token_projection.{k}': v for k, v in plan.tensors.items()}
    out.attrs.update({f'token_projection.{k}': v for k, v in plan.attrs.items()})
    return out
