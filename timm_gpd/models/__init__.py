from . import gpd_mobilenet, gpd_resnet, gpd_vit
