"""benchmarks/coverage.py: one family checked for real, and the driver's cache, resume and summaries."""
import json

import pytest


@pytest.fixture(scope='module')
def coverage(load_script):
    return load_script('benchmarks/coverage.py', 'coverage_bench')


def test_one_family_is_checked_exact_or_refused(coverage):
    exact = coverage.check_family('resnet', 2.0, model='test_resnet')
    assert exact['plain']['status'] == 'exact' and exact['cbr']['status'] == 'exact'
    assert exact['plain']['max_err'] <= exact['plain']['tol']
    # refused up front by timm_gpd, with the block and the reason
    refused = coverage.check_family('coat', 2.0, model='coat_tiny')
    assert refused['plain']['status'] == 'refused' and refused['plain']['stage'] == 'plan'
    assert 'ConvRelPosEnc' in refused['plain']['reason']


def test_driver_caches_results_and_skips_what_is_done(coverage, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_one(module, args, model=None):
        calls.append(module)
        if module == 'ghostnet':
            return {'module': module, 'model': 'ghostnet_050', 'plain': {'status': 'refused', 'stage': 'plan',
                    'reason': 'NotImplementedError: concat'}, 'cbr': {'status': 'refused', 'stage': 'plan',
                    'reason': 'NotImplementedError: concat'}}
        return {'module': module, 'model': 'test_resnet', 'plain': {'status': 'exact'}, 'cbr': {'status': 'exact'}}

    monkeypatch.setattr(coverage, 'run_one', fake_run_one)
    out = str(tmp_path)
    assert coverage.main(['--modules', 'resnet', 'ghostnet', '--output', out]) == 0
    assert calls == ['resnet', 'ghostnet']
    cached = json.loads((tmp_path / 'coverage.json').read_text())
    assert set(cached['families']) == {'resnet', 'ghostnet'} and cached['ratio'] == 2.0
    # a rerun skips both; --rerun with --skip redoes the others only
    assert coverage.main(['--modules', 'resnet', 'ghostnet', '--output', out]) == 0
    assert calls == ['resnet', 'ghostnet']
    assert coverage.main(['--modules', 'resnet', 'ghostnet', '--output', out, '--rerun', '--skip', 'ghostnet']) == 0
    assert calls == ['resnet', 'ghostnet', 'resnet']
    text = (tmp_path / 'coverage.txt').read_text()
    assert 'TOTAL plain (ratio 2, 2 families): exact 1, refused 1' in text
    assert '| ghostnet | ghostnet_050 |' in (tmp_path / 'coverage.md').read_text()
    # another ratio gets its own files
    assert coverage.main(['--modules', 'resnet', '--output', out, '--ratio', '3']) == 0
    assert (tmp_path / 'coverage_r3.json').exists()


def test_unknown_module_is_a_clear_error(coverage, tmp_path, capsys):
    assert coverage.main(['--modules', 'no_such_family', '--output', str(tmp_path)]) == 2
    assert 'not timm model modules: no_such_family' in capsys.readouterr().err
    assert not (tmp_path / 'coverage.json').exists()
