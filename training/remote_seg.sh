#!/usr/bin/env bash
# Detector training runs on a GPU machine (no network there), several runs side by side.
#
# What travels in the ignored folder .gpu/ (`python -m training.pack_remote` builds it here):
#   site.tgz     ultralytics, ultralytics_platform, thop (pure Python) and a polars stand-in
#   seg.tgz      a prep_seg/pbc_pseudo folder (images/{train,val}, labels/{train,val})
#   start.pt     the committed detector's checkpoint (fine-tune start)
#   yolo_config  ultralytics config dir with a TTF font (no font download)
# With `pack_remote --mix NAME`, seg.tgz also holds train.txt / val.txt (lab_mix's lists) and
# valid_sizes.json; the runs then train from those lists.
# Results come back in $OUT as one tar per run (best.pt, last.pt, results.csv) plus the log.
#
#   HOURS=0.11 DEVICE=0 bash training/remote_seg.sh          # three runs side by side
#   CONTINUE=.gpu/gscr_last.pt WORKERS=14 HOURS=0.075 bash training/remote_seg.sh
#   LABS=1 WORKERS=14 HOURS=0.1 bash training/remote_seg.sh  # one multi-lab run: random lab looks
#                                                            # and the lamp correction (train_seg --look)
set -u
HOURS=${HOURS:-0.11}
DEVICE=${DEVICE:-0}
WORKERS=${WORKERS:-5}
OUT=${OUT:-build/remote_out}
WORK=${WORK:-/tmp/smearscope_gpu}
G=$(cd "${GPU_DIR:-.gpu}" && pwd) || exit 1
REPO=$PWD
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
OUT=$(cd "$OUT" && pwd)   # paths absolute: the runs start in $WORK (below)
[ -n "${CONTINUE:-}" ] && CONTINUE=$(realpath "$CONTINUE")
rm -rf "$WORK/seg" "$WORK/site"   # a warm machine may hold an earlier pack (its lists would be used)
tar xzf "$G/site.tgz" -C "$WORK" && tar xzf "$G/seg.tgz" -C "$WORK" || exit 1
# the smearscope package as pyproject maps it (smearscope/ plus the top-level folders), not installed
# there; Python runs from $WORK so that the repository's own smearscope/ (first on sys.path from
# the working directory) does not hide the mapped one
mkdir -p "$WORK/pkg/smearscope" || exit 1
for f in smearscope/*; do ln -sfn "$REPO/$f" "$WORK/pkg/smearscope/"; done
for d in device engines export models service; do ln -sfn "$REPO/$d" "$WORK/pkg/smearscope/$d"; done
export PYTHONPATH="$WORK/site:$WORK/pkg:$REPO" PYTHONUNBUFFERED=1
# the config dir training.env.offline_ultralytics uses, set here too for the import check below
mkdir -p build && cp -r "$G/yolo_config" build/ || exit 1
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False YOLO_CONFIG_DIR="$REPO/build/yolo_config"
TRAIN=images/train VAL=images/val
[ -f "$WORK/seg/train.txt" ] && TRAIN=train.txt VAL=val.txt
printf 'path: %s\ntrain: %s\nval: %s\nnames: {0: rbc, 1: wbc, 2: platelet}\n' \
    "$WORK/seg" "$TRAIN" "$VAL" > "$WORK/seg/data.yaml"
PY=${PY:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # not realpath: a venv's python is a link
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
cd "$WORK" || exit 1
$PY -c "import torch, ultralytics; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ultralytics', ultralytics.__version__)" || exit 1
$PY -c "import smearscope.service.analysis.illumination as m, training.look; print('smearscope from', m.__file__)" || exit 1

run() {  # name, then train_seg options
    local name=$1; shift
    $PY -m training.train_seg --data "$WORK/seg/data.yaml" --hours "$HOURS" --device "$DEVICE" \
        --workers "$WORKERS" --cache "${CACHE:-ram}" --batch 32 --project "$WORK/runs" --name "$name" "$@" \
        >"$OUT/$name.log" 2>&1
    echo "$name exit $?" >>"$OUT/$name.log"
}
start=$(date +%s)
if [ -n "${LABS:-}" ]; then
    # the multi-lab recipe of training/README.md; no RAM cache: --look patches image loading,
    # and a cached tile would keep its first look
    names="glabs"
    CACHE=none run glabs --model "$G/start.pt" --lr0 "${LR0:-0.001}" --optimizer AdamW \
        --warmup-epochs 0.5 --look --look-p 0.8
elif [ -n "${CONTINUE:-}" ]; then
    # one run on all cores, a new schedule from a carried checkpoint (e.g. gscr's last.pt)
    names="gcont"
    run gcont --model "$CONTINUE" --lr0 0.01 --warmup-epochs 1
else
    names="gft gftcp gscr"
    run gft --model "$G/start.pt" --lr0 0.002 --warmup-epochs 1 &
    run gftcp --model "$G/start.pt" --lr0 0.002 --warmup-epochs 1 --copy-paste 0.3 &
    run gscr --model yolo11n-seg.yaml --lr0 0.01 &
    wait
fi
echo "all runs done in $(( $(date +%s) - start )) s"
for name in $names; do
    d="$WORK/runs/$name"
    tail -n 3 "$OUT/$name.log"
    tar cf "$OUT/$name.tar" -C "$d" weights/best.pt weights/last.pt results.csv 2>/dev/null \
        || echo "$name: nothing to pack"
done
tar czf "$OUT/logs.tgz" -C "$OUT" $(for n in $names; do echo $n.log; done) && rm -f "$OUT"/*.log
ls -la "$OUT"
