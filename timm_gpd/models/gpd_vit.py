"""GPD Vision Transformers (ViT, DeiT): heads x ratio with head_dim unchanged; integer ratios only
(LayerNorm over channels is exact only when every channel has the same number of copies)."""
from timm.models import generate_default_cfgs, register_model

from ._builder import build_gpd_model, stock_weights_cfg

default_cfgs = generate_default_cfgs({
    'gpd_vit_tiny_patch16_224.augreg_in21k_ft_in1k': stock_weights_cfg('vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'gpd_deit_tiny_patch16_224.fb_in1k': stock_weights_cfg('deit_tiny_patch16_224.fb_in1k'),
    'gpd_deit_small_patch16_224.fb_in1k': stock_weights_cfg('deit_small_patch16_224.fb_in1k'),
})


@register_model
def gpd_vit_tiny_patch16_224(pretrained=False, **kwargs):
    """ViT-Ti/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_vit_tiny_patch16_224', 'vit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def gpd_deit_tiny_patch16_224(pretrained=False, **kwargs):
    """DeiT-Ti/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_deit_tiny_patch16_224', 'deit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def gpd_deit_small_patch16_224(pretrained=False, **kwargs):
    """DeiT-S/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_deit_small_patch16_224', 'deit_small_patch16_224', pretrained, **kwargs)
