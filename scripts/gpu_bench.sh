#!/usr/bin/env bash
# GPU benchmark, run as it is on a machine with one CUDA GPU (e.g. an H100 or H200):
#   bash scripts/gpu_bench.sh [OUT]      (CIFAR=/path/to/cifar to train on the real set;
#                                         SKIP_TRAIN=1 runs parts 2 and 3 only)
# 1. ResNet-110 training through the real path (Lightning, logging, checkpoints), plain fp32
#    eager against bf16 + channels_last + CUDA graphs, images/s from train/images_per_s
#    (training steps only; EPOCHS epochs each, default 3);
# 2. every fast path against its naive reference at the paper's scale (bench.json);
# 3. ResNet-200 memory and throughput by batch size (bf16 + channels_last).
# Each part writes its results under OUT as it finishes.
set -euo pipefail
OUT=${1:-runs/gpu-bench}
PY=${PY:-python3}
EPOCHS=${EPOCHS:-3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

if [ -z "${SKIP_TRAIN:-}" ]; then
if [ -n "${CIFAR:-}" ]; then
  DATA="data.name=cifar10 data.root=$CIFAR data.gpu_augment=true"
else
  DATA="data.name=synthetic data.synthetic_size=50000 data.image_size=32"
fi
COMMON="trainer.max_epochs=$EPOCHS trainer.accelerator=gpu trainer.devices=1 analysis.run=[] out_dir=$OUT/train"
$PY -m resens.train configs/cifar10_resnet110.yaml $DATA $COMMON name=fp32-eager \
    trainer.precision=32-true 2>&1 | tail -3
$PY -m resens.train configs/cifar10_resnet110.yaml $DATA $COMMON name=bf16-cl-graphs \
    trainer.precision=bf16-mixed model.channels_last=true model.compile=reduce-overhead 2>&1 | tail -3
$PY - "$OUT/train" <<'PY' | tee "$OUT/train.txt"
import json
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from wandb_records import read_records, run_file

for run in sorted(Path(sys.argv[1]).iterdir()):
    rates = [
        json.loads(i.value_json)
        for r in read_records(run_file(run)) if r.WhichOneof("record_type") == "history"
        for i in r.history.item if (i.key or "/".join(i.nested_key)) == "train/images_per_s"
    ]
    print(f"{run.name:40s} images/s per epoch: {[round(x) for x in rates]}")
PY
fi

$PY -m resens.bench --device cuda --out "$OUT" | tee "$OUT/bench.txt"

$PY - <<'PY' | tee "$OUT/resnet200_memory.txt"
import time, torch, torch.nn.functional as F
from resens.models import imagenet_resnet
print("batch  peak_GiB  img/s  (ResNet-200, 224x224, bf16 + channels_last, SGD step)")
for batch in (32, 64, 128, 256):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    model = imagenet_resnet(200).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    try:
        for i in range(8):
            if i == 3:
                torch.cuda.synchronize(); t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"{batch:5d}  {torch.cuda.max_memory_allocated() / 2**30:8.1f}  {5 * batch / (time.perf_counter() - t):6.0f}", flush=True)
    except torch.OutOfMemoryError:
        print(f"{batch:5d}  out of memory")
    del model, opt, x, y
PY
