"""Hub side of timm-gpd: publish extracted students as stock timm models, and load them offline.

    hfhub.publish     python -m hfhub.publish --checkpoint output/EXP/last.pth --repo-id ORG/NAME [--dry-run DIR]
    hfhub.cache       Hugging Face cache layout offline; clear errors for missing Hub models
    hfhub.card        the model card (huggingface_hub ModelCard with eval results)
    hfhub.export      a run's preprocessing and class names for the student's config.json

Reading checkpoints and writing the student (model.safetensors + config.json) is
timm_gpd.checkpoint, shared with train.py and validate.py.

Submodules are not imported here, so `python -m hfhub.publish` runs its module only once. Nothing here
is needed to *use* a published student: `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` is
plain timm.
"""
