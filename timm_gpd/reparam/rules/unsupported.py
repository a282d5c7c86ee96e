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
    *(('timm.models.inception_v4', n, CONCAT_BRANCHES) for n in (
        'Mixed3a', 'Mixed4a', 'Mixed5a', 'InceptionA', 'ReductionA', 'InceptionB', 'ReductionB', 'InceptionC')),
    *(('timm.models.inception_resnet_v2', n, CONCAT_BRANCHES) for n in (
        'Mixed_5b', 'Block35', 'Mixed_6a', 'Block17', 'Mixed_7a', 'Block8')),
    *(('timm.models.nasnet', n, 'concatenates the outputs of its cell branches') for n in (
        'CellStem0', 'CellStem1', 'FirstCell', 'NormalCell', 'ReductionCell0', 'ReductionCell1')),
    *(('timm.models.pnasnet', n, 'concatenates the outputs of its cell branches') for n in ('CellStem0', 'Cell')),
    ('timm.models.fasternet', 'Partial_conv3', 'splits off a fixed number of channels for its conv'),
    ('timm.models.focalnet', 'FocalModulation', 'splits its projection into query, context and per-level gates'),
    ('timm.models.mambaout', 'GatedConvBlock', 'splits its hidden channels into gate, identity and conv parts'),
    ('timm.models.nextvit', 'NextTransformerBlock', 'concatenates its attention and conv paths'),
    ('timm.models.coat', 'ConvRelPosEnc', 'splits its channels into head groups of fixed sizes, one kernel each'),
    ('timm.models.inception_next', 'InceptionDWConv2d', 'splits its channels into fixed-size branches'),
    ('timm.models.edgenext', 'SplitTransposeBlock', 'splits its channels into fixed-size scales'),
    ('timm.models.volo', 'OutlookAttention', 'reshapes its values into per-head unfolded windows of a fixed head count'),
    ('timm.models.tnt', 'PixelEmbed', 'reshapes its pixel features with a fixed inner width'),
    ('timm.models.tnt', 'Block', "flattens its pixel tokens (pixels x inner channels) into the outer token's channels"),
    ('timm.models.swiftformer', 'EfficientAdditiveAttention',
     'L2-normalizes its queries and keys over channels (r copies have sqrt(r) times the norm)'),
    ('timm.models.nest', 'Attention', 'lays its output channels out head-minor (head_dim x heads)'),
    ('timm.models.rdnet', 'DenseStage', 'concatenates the features of its blocks along channels'),
)

for _module, _name, _reason in UNSUPPORTED_TIMM_BLOCKS:
    for _type in timm_types(_module, _name):
        register_unsupported(_type, _reason)
