from . import gpd_mobilenet, gpd_resnet, gpd_vit
from ._builder import (
    GPD_KWARGS, create_gpd_student, gpd_student_arch, is_gpd_model_name, split_gpd_kwargs, wrap_gpd_student,
)
