"""EVA (and the DINOv3 / PE ViTs built on it): attention, layer scales, model tokens, rotary
embeddings (they rotate within head_dim, which does not widen: nothing to change)."""
from ._registry import ModulePlan, register_rule, timm_types
from .layers import channel_vectors, multi_head_attention_rule

register_rule(*timm_types('timm.models.eva', 'EvaAttention'))(multi_head_attention_rule)
register_rule(*timm_types('timm.models.eva', 'EvaBlock', 'EvaBlockPostNorm'))(channel_vectors('gamma_1', 'gamma_2'))
register_rule(*timm_types('timm.models.eva', 'Eva'))(channel_vectors('cls_token', 'reg_token', 'pos_embed'))
register_rule(*timm_types(
    'timm.layers.pos_embed_sincos', 'RotaryEmbedding', 'RotaryEmbeddingCat', 'RotaryEmbeddingMixed',
    'RotaryEmbeddingDinoV3'))(lambda m, ctx: ModulePlan())
