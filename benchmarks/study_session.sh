#!/usr/bin/env bash
# A time-boxed session of the study on a machine that keeps nothing (a lent GPU): train what fits
# in MINUTES, rebuild the tables, export each student's best GPD run, and pack what must travel
# back into ARCHIVE_DIR, in files of at most 15 MB:
#   results.tgz   the study's folder without weights or logs (summaries, args, tables, plots)
#   logtails.tgz  the last 20 kB of every run's log
#   pub.tar.*     the exported best GPD student (PUBLISHED, e.g. resnet18.gpd_fmnist), split
#   bn_check.txt  benchmarks/bn_check.py on every GPD run of this session whose student failed its DT
#   replica_spread.txt  benchmarks/replica_spread.py on every GPD run of this session (2,000 images)
#   loader_cost.txt  on a GPU: benchmarks/loader_cost.py at the config's batch size and workers
# results.tgz holds the study's folder by its name (tar xzf results.tgz -C benchmarks/results).
# Runs that were cut off are in it with the epochs they finished; nothing resumes them.
#
# usage: benchmarks/study_session.sh CONFIG MINUTES JOBS ARCHIVE_DIR [PUBLISHED] [IDX_GZ_DIR]
#   IDX_GZ_DIR: Fashion-MNIST's four *-ubyte.gz files, where the Debian package cannot be installed
#   env: PYTHON (default python3), GPD_STUDY_COMMIT (the commit this copy of the tree was made
#   from), STUDY_OUTPUT (default benchmarks/results/study_<config name>), DATA_DIR (default data)
set -u
if [ $# -lt 4 ]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
config=$(realpath -m "$1"); minutes=$2; jobs=$3; archive=$(realpath -m "$4")
published=${5:-resnet18.gpd_fmnist}; idx=${6:+$(realpath -m "$6")}
data=$(realpath -m "${DATA_DIR:-data}")
output=${STUDY_OUTPUT:+$(realpath -m "$STUDY_OUTPUT")}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
start=$(date +%s)
mkdir -p "$archive"
log=$archive/driver.log
if [ -n "$idx" ]; then
    mkdir -p "$data/FashionMNIST/raw"
    for f in "$idx"/*-ubyte.gz; do
        out=$data/FashionMNIST/raw/$(basename "$f" .gz)
        [ -f "$out" ] || gunzip -c "$f" > "$out"
    done
fi
name=$(basename "$config" .yaml)
results=${output:-$PWD/benchmarks/results/study_${name#study_}}
study=(benchmarks/study.py --config "$config" --data-dir "$data" --output "$results")
export PYTHONUNBUFFERED=1
# on a GPU, first what a batch costs to load: PIL in loader workers against train.py's
# --device-augment, at the config's batch size and workers (benchmarks/loader_cost.py)
spent=0
if $py -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    measured=$(date +%s)
    read -r batch workers < <($py -c "import sys, yaml; t = yaml.safe_load(open(sys.argv[1]))['train']; \
print(t.get('batch_size', 128), t.get('workers', 2))" "$config")
    timeout 90 $py benchmarks/loader_cost.py --data-dir "$data" --device cuda --batch-size "$batch" \
        --workers "$workers" > "$archive/loader_cost.txt" 2>&1
    spent=$(( $(date +%s) - measured ))
fi
# the last 150 s are the tables', the checks' and the packing's; a run starts only if its estimate
# ends 30 s before that
budget=$(( minutes * 60 - 150 - spent ))
within=$($py -c "print(f'{max(0.0, ($budget - 30) / 3600):.4f}')")
echo "session: $config, $minutes min, --jobs $jobs, runs must end within $within h" | tee "$log"
timeout -k 15 "$budget" $py "${study[@]}" --jobs "$jobs" --finish-within "$within" 2>&1 | tee -a "$log"
echo "training stopped after $(( $(date +%s) - start )) s" | tee -a "$log"
$py "${study[@]}" --collect-only >> "$log" 2>&1
pub_dir=$(mktemp -d)
$py "${study[@]}" --publish-best "$pub_dir" 2>&1 | tee -a "$log"
# a student that failed its DT: its weights or its BatchNorm statistics? (only this session's runs
# have their final.pth here)
for run in $($py "${study[@]}" --list-failed); do
    if [ -f "$results/runs/$run/final.pth" ]; then
        timeout 120 $py benchmarks/bn_check.py --checkpoint "$results/runs/$run/final.pth" --data-dir "$data" \
            >> "$archive/bn_check.txt" 2>&1
    fi
done
# has each DT used its width: how far its replicas and features moved from its student (one process)
spread_runs=()
for f in "$results"/runs/*gpd*/final.pth; do
    [ -f "$f" ] && spread_runs+=("$f")
done
if [ ${#spread_runs[@]} -gt 0 ]; then
    timeout 60 $py benchmarks/replica_spread.py --checkpoint "${spread_runs[@]}" --data-dir "$data" --limit 2000 \
        > "$archive/replica_spread.txt" 2>&1
fi
tar czf "$archive/results.tgz" --exclude='*.pth' --exclude='*.safetensors' --exclude=.lock --exclude=logs \
    -C "$(dirname "$results")" "$(basename "$results")"
tails=$(mktemp -d)/logtails
mkdir -p "$tails"
for f in "$results"/logs/*.log; do
    [ -f "$f" ] && tail -c 20000 "$f" > "$tails/$(basename "$f")"
done
tar czf "$archive/logtails.tgz" -C "$(dirname "$tails")" logtails
if [ -d "$pub_dir/$published" ]; then
    (cd "$pub_dir" && tar cf - "$published") | split -b 15M - "$archive/pub.tar."
fi
echo "session done after $(( $(date +%s) - start )) s" | tee -a "$log"
