#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, a short real GPD run on Fashion-MNIST
# (resnet18 student in a 2x dynamic teacher, from scratch), then validate the extracted student
# both as train.py wrote it and after a dry-run publish loaded back through a Hub cache.
# Extra arguments go to train.py (e.g. --epochs 5 --train-limit 60000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/get_fashion_mnist.sh data
py=.venv/bin/python
exp=${EXPERIMENT:-demo-gpd-resnet18}
data=(--data-dir data --dataset torch/fashion_mnist)
# the demo's own folder starts empty: train.py would otherwise pick a new name (EXP-1) and the
# steps below would validate the previous run's student
rm -rf "output/$exp"

$py train.py "${data[@]}" --model resnet18 --in-chans 1 --img-size 32 --mean 0.2860 --std 0.3530 \
    --gpd --gpd-ratio 2 --epochs 2 --batch-size 64 --lr 0.05 --warmup-epochs 0 \
    --train-limit 2048 --val-limit 1000 --precise-bn 4 --workers 2 \
    --output output --experiment "$exp" "$@"

echo "== the extracted student (stock timm resnet18), as train.py exported it"
$py validate.py "${data[@]}" --limit 1000 --checkpoint "output/$exp/student.safetensors"

echo "== published (dry run) and pulled back offline through a Hugging Face cache"
rm -rf "output/$exp/hub"
$py -m hfhub.publish --checkpoint "output/$exp/last.pth" --repo-id timm-gpd/resnet18.gpd_fmnist \
    --dry-run "output/$exp/hub/resnet18.gpd_fmnist"
export HF_HOME="$PWD/output/$exp/hub/hf_home" HF_HUB_OFFLINE=1
$py -m hfhub.cache "output/$exp/hub/resnet18.gpd_fmnist" --repo-id timm-gpd/resnet18.gpd_fmnist
$py validate.py "${data[@]}" --limit 1000 --model hf-hub:timm-gpd/resnet18.gpd_fmnist --pretrained
