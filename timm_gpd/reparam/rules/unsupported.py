"""timm blocks refused up front, with the reason.

Their forward splits, concatenates or reshapes channels by count: without this table the DT's
forward fails with a shape error of its own, or the exactness check names them only after the
whole DT was built.
"""
from ._registry import register_unsupported, timm_types

CONCAT_BRANCHES = 'concatenates its branches'
UNSUPPORTED_TIMM_BLOCKS = (
    ('timm.models.densenet', 'DenseLayer', 'concatenates the features of earlier layers along channels'),
    ('timm.models.densenet', 'DenseBlock', 'concatenates the features of its layers along channels'),
    ('timm.models.cspnet', 'CrossStage', 'splits its channels in two parts and concatenates them'),
    ('timm.models.cspnet', 'CrossStage3', 'splits its channels in two parts and concatenates them'),
    ('timm.models.ghostnet', 'GhostModule', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.ghostnet', 'GhostModuleV2', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.ghostnet', 'GhostModuleV3', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.dpn', 'DualPathBlock', 'splits and concatenates its residual and dense paths'),
    ('timm.models.rexnet', 'LinearBottleneck', 'adds its shortcut to the first channels only'),
    ('timm.layers.selective_kernel', 'SelectiveKernel', 'splits and reshapes its channels into kernel paths'),
    ('timm.layers.split_attn', 'SplitAttn', 'reshapes its channels into radix splits and weighs them by a softmax across the splits'),
    ('timm.models.res2net', 'Bottle2neck', 'splits its channels into scales'),
    ('timm.models.dla', 'DlaBottle2neck', 'splits its channels into scales'),
    ('timm.models.dla', 'DlaRoot', 'concatenates the outputs of its children'),
    ('timm.layers.mixed_conv2d', 'MixedConv2d', 'splits its channels into fixed-size groups, one kernel size each'),
    ('timm.models.vovnet', 'OsaBlock', 'concatenates the outputs of its layers'),
    ('timm.models.inception_v3', 'InceptionA', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionB', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionC', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionD', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionE', CONCAT_BRANCHES),
    ('timm.models.selecsls', 'SelecSlsBlock', 'concatenates the outputs of its layers'),
    ('timm.models.hgnet', 'HighPerfGpuBlock', 'concatenates the outputs of its layers'),
    ('timm.models.mobilevit', 'MobileVitBlock', 'concatenates its input with the output of its transformer'),
    ('timm.models.mlp_mixer', 'SpatialGatingUnit', 'splits its channels in two halves (gMLP)'),
    ('timm.models.efficientvit_mit', 'LiteMLA', 'concatenates its multi-scale q/k/v and reshapes them into heads'),
)

for _module, _name, _reason in UNSUPPORTED_TIMM_BLOCKS:
    for _type in timm_types(_module, _name):
        register_unsupported(_type, _reason)
