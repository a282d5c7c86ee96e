#!/usr/bin/env bash
# Lay out Fashion-MNIST for `timm.data.create_dataset('torch/fashion_mnist', root=ROOT)`
# without network access to the dataset's own host: the Debian package ships the idx files.
#
# usage: scripts/get_fashion_mnist.sh ROOT
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 ROOT" >&2
    exit 2
fi
root=$1
src=/usr/share/datasets/fashion-mnist
files="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

if [ ! -f "$src/train-images-idx3-ubyte.gz" ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update
    $sudo apt-get install -y dataset-fashion-mnist
fi

# torchvision's FashionMNIST reads the uncompressed idx files from ROOT/FashionMNIST/raw/
raw="$root/FashionMNIST/raw"
mkdir -p "$raw"
for f in $files; do
    if [ ! -f "$src/$f.gz" ]; then
        echo "error: $src/$f.gz is missing; is dataset-fashion-mnist installed correctly?" >&2
        exit 1
    fi
    if [ ! -s "$raw/$f" ]; then
        # write to a temporary name first so an interrupted run never leaves a truncated file
        gunzip -c "$src/$f.gz" > "$raw/$f.tmp"
        mv "$raw/$f.tmp" "$raw/$f"
    fi
done
echo "Fashion-MNIST ready in $raw"
