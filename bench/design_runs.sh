#!/usr/bin/env bash
# Regenerates bench/results/design/*.json and the designer plots in docs/img from the current model and catalog.
# Designer runs are pure computation (seconds each, no timing): no bench lock needed.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${NEARSTORE:-.venv/bin/nearstore}
R=bench/results/design
mkdir -p "$R" docs/img
rm -f "$R"/*.json
export COLUMNS=200
$N design --validate --json $R/validate.json
$N design --workload resnet50-train --json $R/resnet50-train.json --plot docs/img/design-resnet50.png
$N design --workload resnet50-train --dataset-samples 51246680 --json $R/resnet50-train-40x.json
$N design --workload resnet50-train --no-gpu-decode --json $R/resnet50-train-cpu-only.json
$N design --workload resnet50-train --gpus 64 --json $R/resnet50-train-64gpu.json --plot docs/img/design-resnet50-64gpu.png
$N design --workload resnet50-infer --json $R/resnet50-infer.json
$N design --workload features-head --json $R/features-head.json
$N design --workload preprocess-only --json $R/preprocess-only.json
$N design --workload unet3d-train --json $R/unet3d-train.json
$N design --workload unet3d-train --dataset-samples 50000 --json $R/unet3d-train-50k.json --plot docs/img/design-unet3d.png
$N design --workload unet3d-train --dataset-samples 50000 --gpus 64 --json $R/unet3d-train-50k-64gpu.json
$N design --workload resnet50-train --no-gpu-decode --core-ms 5 --json $R/resnet50-train-slow-cpu.json
for w in resnet50-train resnet50-infer features-head; do
  $N design --sensitivity --workload $w --json $R/sensitivity-$w.json --plot docs/img/design-sensitivity-$w.png
done
$N design --sensitivity --workload unet3d-train --dataset-samples 50000 --json $R/sensitivity-unet3d-train-50k.json \
  --plot docs/img/design-sensitivity-unet3d-train-50k.png
$N design --accelerators-fed --accelerator h100-mlperf --json $R/fed-resnet50-h100-mlperf.json
$N design --accelerators-fed --accelerator a100-mlperf --json $R/fed-resnet50-a100-mlperf.json
$N design --accelerators-fed --accelerator h100 --json $R/fed-resnet50-h100.json
$N design --accelerators-fed --accelerator h100 --no-gpu-decode --json $R/fed-resnet50-h100-cpu-only.json
$N design --accelerators-fed --workload unet3d-train --accelerator h100-mlperf-unet3d --json $R/fed-unet3d-h100-mlperf.json
$N design --accelerators-fed --workload preprocess-only --json $R/fed-preprocess-only.json
$N design --scale --gpus 64 --workload unet3d-train --dataset-samples 50000 --json $R/scale-unet3d-64-h100.json
$N design --scale --gpus 256 --gpu h100 --workload resnet50-train --dataset-samples 51246680 --json $R/scale-resnet50-40x-256-h100.json
