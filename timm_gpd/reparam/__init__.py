"""The mathematics of GPD: inverse reparameterization, CBR branches, the shared student."""
from .branches import CBRConv2d, convert_to_cbr, merge_cbr
from .expansion import ChannelMap, TensorPlan
from .model import GPDModel
from .rules import ModulePlan, RuleContext, register_rule, register_unsupported
from .widen import inverse_reparameterize, plan_expansion
