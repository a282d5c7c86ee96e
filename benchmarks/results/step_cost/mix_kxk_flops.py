"""Lower bound of CBR's per-step cost: the FLOPs of its mix_kxk merges (forward + backward), against the
floor's FLOPs (static-teacher forward + plain wide DT fwd+bwd + student fwd+bwd), counted by torch's
FlopCounterMode at batch 1 and scaled to the batch. No timing: FLOP counts only.

    python benchmarks/results/step_cost/mix_kxk_flops.py > benchmarks/results/step_cost/mix_kxk_flops.txt
"""
import sys, torch, timm
import os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))
import timm_gpd
from timm_gpd.reparam.branches import CBRConv2d
from torch.utils.flop_counter import FlopCounterMode
def fwd_flops(m, x):
    with FlopCounterMode(display=False) as f:
        m(x)
    return f.get_total_flops()
for s_name, t_name, img, bs in (('resnet18', 'resnet34', 224, 32), ('mobilenetv2_100', 'resnet50', 224, 32),
                                ('resnet18', 'resnet34', 32, 128), ('resnet18', 'resnet34', 64, 16)):
    ncls = 10 if img == 32 else 1000
    torch.manual_seed(0)
    student = timm.create_model(s_name, num_classes=ncls).eval()
    teacher = timm.create_model(t_name, num_classes=ncls).eval()
    wide = timm_gpd.inverse_reparameterize(student, ratio=2.0, check=False).eval()
    gpd = timm_gpd.GPDModel(student, ratio=2.0, check=False)
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        floor = bs * (fwd_flops(teacher, x) + 3 * fwd_flops(wide, x) + 3 * fwd_flops(student, x))
    merge = 0
    for net in (gpd.teacher, gpd.student):
        for m in net.modules():
            if isinstance(m, CBRConv2d) and 'mix_kxk' in getattr(m, 'branches', ('mix_kxk',)):
                co, ci_g, kh, kw = m.weight.shape if hasattr(m, 'weight') else (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
                # merged kernel = kxk (co x ci_g) @ 1x1 (ci x ci): co*ci_g*ci_g*k*k MACs per group layout
                merge += 2 * 3 * co * ci_g * ci_g * kh * kw  # 2 FLOP per MAC, fwd + 2 bwd products
    print(f'{s_name}:{t_name} {img}px b{bs}: floor {floor/1e9:.1f} GFLOP, mix_kxk merges {merge/1e9:.1f} GFLOP '
          f'-> GPD/floor >= 1 + {merge/floor:.3f} from them (if run at the floor\'s FLOP rate)')
