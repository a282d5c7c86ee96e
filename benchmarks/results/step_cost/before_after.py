"""GPD step and its floor (static-teacher forward + plain wide DT fwd/bwd + student fwd/bwd) in CPU
time, one thread, median of 3, for the timm_gpd package found in the directory given first.

Compares two versions of the code in separate processes, e.g. before and after issue 13:

    mkdir -p /tmp/old /tmp/new
    git archive 18c2ed3 timm_gpd | tar -x -C /tmp/old
    git archive HEAD timm_gpd | tar -x -C /tmp/new
    for i in 1 2; do for c in old new; do
        python benchmarks/results/step_cost/before_after.py /tmp/$c 32 128 10; done; done

Arguments: package directory, image size, batch size, number of classes (resnet18:resnet34, ratio 2).
"""
import json, sys, time, torch, timm
sys.path.insert(0, sys.argv[1])
import timm_gpd
from timm_gpd.task import TrainTask
from timm_gpd.losses import DynamicTeacherKD, kd_loss_from_name
torch.set_num_threads(1)
img, bs, ncls = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
student = timm.create_model('resnet18', num_classes=ncls)
teacher = timm.create_model('resnet34', num_classes=ncls).eval().requires_grad_(False)
gpd = timm_gpd.GPDModel(student, ratio=2.0, check=False)
wide = timm_gpd.inverse_reparameterize(student, ratio=2.0, check=False).train()
ce = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
opt = torch.optim.SGD(gpd.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
task = TrainTask(gpd, opt, ce, dynamic_teacher=True, static_teacher=teacher, kd_loss=kd_loss_from_name('dkd'),
                 dt_loss=DynamicTeacherKD(), clip_grad=5.0)
g = torch.Generator().manual_seed(0)
x = torch.randn(bs, 3, img, img, generator=g); y = torch.randint(0, ncls, (bs,), generator=g)
def fb(m):
    m.zero_grad(set_to_none=True); ce(m(x), y).backward()
def tf():
    with torch.no_grad(): teacher(x)
units = {'gpd': lambda: task.step(x, y), 'teacher_fwd': tf, 'dt_fwd_bwd': lambda: fb(wide), 'student_fwd_bwd': lambda: fb(student)}
for f in units.values(): f()
res = {k: [] for k in units}
for _ in range(3):
    for k, f in units.items():
        t = time.process_time(); f(); res[k].append(time.process_time() - t)
med = {k: sorted(v)[1] for k, v in res.items()}
floor = med['teacher_fwd'] + med['dt_fwd_bwd'] + med['student_fwd_bwd']
print(json.dumps({'code': sys.argv[1], 'img': img, 'batch': bs, **{k: round(v * 1e3, 1) for k, v in med.items()},
                  'floor': round(floor * 1e3, 1), 'gpd/floor': round(med['gpd'] / floor, 3)}), flush=True)
