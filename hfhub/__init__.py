"""Hub side of timm-gpd: publish extracted students as stock timm models, and load them offline.

    hfhub.publish     python -m hfhub.publish --checkpoint output/EXP/last.pth --repo-id ORG/NAME [--dry-run DIR]
    hfhub.cache       Hugging Face cache layout offline; clear errors for missing Hub models
    hfhub.checkpoint  read train.py checkpoints, rebuild and extract the student
    hfhub.card        the model card (README.md with YAML front matter)
    hfhub.export      the student in timm's Hub layout (model.safetensors + config.json)

Submodules are not imported here, so `python -m hfhub.publish` runs its module only once. Nothing here
is needed to *use* a published student: `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` is
plain timm.
"""
