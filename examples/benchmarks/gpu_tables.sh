#!/usr/bin/env bash
# The GPU tables of the README and docs/speed.md / docs/compile.md: bench_speed.py and bench_compile.py
# on CUDA in bf16 (autocast) for ResNet-50 at 224 x 224, CifarResNet-110 and ViT-S/16 at 224 x 224.
#
#   bash examples/benchmarks/gpu_tables.sh [OUT_DIR]     # logs to OUT_DIR (default ./gpu_tables)
#
# Sized for a short lease of one GPU (about 9 minutes in all): each part has its own time limit so that
# one slow compile does not cost the other tables, and bench_compile runs a subset of its configurations
# with Inductor's caches on (--cache: a configuration whose graph an earlier one compiled, e.g. batch
# drop at budget 1.0 after the plain model, reuses its kernels; the first of each graph compiles cold).
# Run once on an H200 with torch 2.11 (docs/compile.md): the eager part took 67 s; each compile part
# printed only its plain model's compile (24-80 s cold) before its limit. The compile parts need
# torch >= 2.14 and longer limits than one 15-minute lease gives to all three models.
set -u
out=${1:-gpu_tables}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
bench=examples/benchmarks

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date -u +%T)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? $(date -u +%T)"
    grep -E '^\||^torch|^NVIDIA|compiled in|Error|error' "$out/$name.log" | tail -40
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, lightning, timm, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"

part speed 150 python3 $bench/bench_speed.py --device cuda --dtype bfloat16 --models resnet50 cifar110 vit_small \
    --image-size 224 --batch-size 64 --steps 10 --repeats 5
part compile_cifar110 130 python3 $bench/bench_compile.py --device cuda --dtype bfloat16 --models cifar110 --batch-size 64 --channels-last \
    --steps 10 --repeats 5 --cache --configs "batch 0.5" "batch 1.0" "subset 0.5" "batch 0.5, regional"
part compile_resnet50 150 python3 $bench/bench_compile.py --device cuda --dtype bfloat16 --models resnet50 --batch-size 64 \
    --steps 10 --repeats 5 --cache --channels-last --configs "batch 0.5" "batch 1.0" "subset 0.5"
part compile_vit_small 110 python3 $bench/bench_compile.py --device cuda --dtype bfloat16 --models vit_small --image-size 224 \
    --batch-size 64 --steps 10 --repeats 5 --cache --configs "batch 0.5" "batch 1.0" "subset 0.5" "timm DropPath 0.5"
