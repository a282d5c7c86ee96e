"""GPD ResNets: a ResNet student inside a 2x-wide dynamic teacher (``gpd_ratio`` changes it)."""
from timm.models import generate_default_cfgs, register_model

from ._builder import build_gpd_model, fmnist_cfg, stock_weights_cfg

# the first tag of each model is its default: pretrained=True starts from timm's ImageNet student
default_cfgs = generate_default_cfgs({
    'gpd_resnet18.a1_in1k': stock_weights_cfg('resnet18.a1_in1k'),
    'gpd_resnet18.fmnist': fmnist_cfg('resnet18'),
    'gpd_resnet34.a1_in1k': stock_weights_cfg('resnet34.a1_in1k'),
    'gpd_resnet50.a1_in1k': stock_weights_cfg('resnet50.a1_in1k'),
})


@register_model
def gpd_resnet18(pretrained=False, **kwargs):
    """ResNet-18 student, GPD dynamic teacher (ratio 2, CBR on by default)."""
    return build_gpd_model('gpd_resnet18', 'resnet18', pretrained, **kwargs)


@register_model
def gpd_resnet34(pretrained=False, **kwargs):
    """ResNet-34 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_resnet34', 'resnet34', pretrained, **kwargs)


@register_model
def gpd_resnet50(pretrained=False, **kwargs):
    """ResNet-50 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_resnet50', 'resnet50', pretrained, **kwargs)
