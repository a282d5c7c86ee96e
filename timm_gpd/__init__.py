"""timm-gpd: Gap Preserving Distillation for timm models.

Importing the package registers the ``gpd_*`` models with timm.
"""
from .reparam import (
    CBRConv2d, ChannelMap, GPDModel, ModulePlan, RuleContext, TensorPlan, convert_to_cbr, inverse_reparameterize,
    merge_cbr, plan_expansion, register_rule, register_unsupported,
)
from . import models

__version__ = '0.1.0'
