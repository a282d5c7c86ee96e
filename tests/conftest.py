""" Shared pytest fixtures: repository paths, offline data, the repository's scripts as modules. """
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_PACKAGE_DIR = Path('/usr/share/datasets/fashion-mnist')

# tests import timm_gpd and the repository's scripts without an installed package
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def load_script():
    """ Import a script of the repository (train.py, benchmarks/*.py) by path, as a module. """
    def load(relative_path: str, name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope='session')
def fashion_mnist_root(tmp_path_factory) -> Path:
    """ A dataset root where timm.data.create_dataset('torch/fashion_mnist', root=...) works offline. """
    if not (FASHION_MNIST_PACKAGE_DIR / 'train-images-idx3-ubyte.gz').exists():
        pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
    root = tmp_path_factory.mktemp('fashion_mnist')
    subprocess.run(['bash', str(REPO_ROOT / 'scripts' / 'get_fashion_mnist.sh'), str(root)],
                   check=True, capture_output=True)
    return root


@pytest.fixture(scope='session')
def subprocess_env() -> dict:
    """ Environment for CLI subprocesses: offline, and the repository importable (copy before changing). """
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get('PYTHONPATH')) if p)
    env['HF_HUB_OFFLINE'] = '1'
    return env
