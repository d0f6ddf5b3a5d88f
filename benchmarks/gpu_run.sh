#!/usr/bin/env bash
# The GPU measurements, in stages, for a lent machine that has PyTorch, timm and transformers but
# not dp-accounting or Opacus (their wheels travel in .whl/). Each stage's output is tarred into
# $OUT (or ./gpu-out), one file per stage, with the stage's log.
#
#     benchmarks/gpu_run.sh env check scaling largest  # exactness on CUDA, a digits run, N = 1 scaling, largest ViT
#     benchmarks/gpu_run.sh bench-vit                  # dpspeed bench, ViT-base, bf16, Opacus beside
#     benchmarks/gpu_run.sh bench-bit speed-tf32 speed-fp32  # BiT-ResNet-50x1 bench; ViT-base side by side
#     benchmarks/gpu_run.sh kernel speed-bf16          # the fused ghost norm, then today's path beside it
#     benchmarks/gpu_run.sh memory                     # one step's peak per mode and style (ViT-base, BiT)
#
# The seed study (issue 16), each stage at most ~9 minutes, resumable: its results go to
# benchmarks/results/h100/study-*/ inside the repository (tarred into $OUT as well), and a stage cut
# off by its limit is continued by running it again on a checkout holding what it left
# (`dpspeed bench --resume` measures only what is missing). Commit the folders between calls.
#     benchmarks/gpu_run.sh study-vit-bf16 study-vit-tf32 study-vit-fp32   # ViT-base: every mode, Opacus, JAX
#     benchmarks/gpu_run.sh study-bit-bf16 study-bit-tf32 study-bit-fp32   # BiT-ResNet-50x1 likewise
#     benchmarks/gpu_run.sh size-vit-tiny size-vit-small size-vit-base size-vit-large size-vit-huge  # Fig. 1-3
#     benchmarks/gpu_run.sh size-bit-50x1 size-bit-50x3 size-bit-101x1 size-bit-101x3               # Table 2
#     benchmarks/gpu_run.sh compile-vit                 # torch.compile against eager (study-vit-bf16 is eager)
# The JAX peer needs flax, optax and jax-privacy beside the machine's JAX: their wheels travel in .whl/
# with dp-accounting's and Opacus's (`pip download --no-deps -d .whl flax optax jax-privacy ...`).
# The size curves run in fp32 and TF32, as the seed's (Fig. 7 is their ratio), with the modes the
# seed compared (the memory profile and Fact 6.1 come with every study-* stage).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# fewer fragmentation failures right after the batch search has found the edge of memory
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
VIT="timm:vit_base_patch16_224 --image-size 224 --num-classes 100"
BIT="timm:resnetv2_50x1_bit --image-size 224 --num-classes 100"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log and tar its folder
    local name=$1 limit=$2
    shift 2
    mkdir -p "/tmp/stages/$name"
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"/tmp/stages/$name/log.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n 25 "/tmp/stages/$name/log.txt"
    tar -czf "$OUT/$name.tar.gz" -C /tmp/stages "$name"
}

results() {  # results STAGE FOLDER SECONDS BENCH-OPTIONS...: dpspeed bench --resume into the repository
    local name=$1 folder=benchmarks/results/h100/$2 limit=$3
    shift 3
    stage "$name" "$limit" python3 -m dpspeed bench "$@" --repeats 3 --warmup 1 --no-progress --resume --out "$folder"
    tar -czf "$OUT/$name-results.tar.gz" "$folder"
}

for s in "$@"; do
    D=/tmp/stages/$s
    case $s in
    env)
        stage env 60 bash -c "nvidia-smi; python3 -c 'import sys, torch, timm, transformers, opacus, dp_accounting; \
print(sys.version, torch.__version__, torch.version.cuda, timm.__version__, transformers.__version__, opacus.__version__)'" ;;
    check)
        stage check 200 env DPSPEED_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -x -q \
            tests/test_exactness.py tests/layers/test_precision.py
        stage train 60 python3 -m dpspeed train --device cuda --epochs 2 --no-progress --out "/tmp/stages/train/run" ;;
    largest)  # one process per model: a failed attempt leaves nothing behind for the next
        stage largest 140 bash -c "for m in vit_3b_patch14_224 vit_5b_patch14_224; do \
            python3 benchmarks/largest_model.py --device cuda --precision bf16 --placements sharded+offload \
            --models \$m --out /tmp/stages/largest/offload_\$m.json; done" ;;
    precision)
        stage precision 60 env DPSPEED_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -x -q tests/layers/test_precision.py ;;
    scaling)
        stage scaling 60 python3 -m torch.distributed.run --nproc-per-node 1 -m dpspeed bench --scaling \
            --model $VIT --precisions bf16 --scaling-batch 128 --accumulate 4 --bandwidth 50e9 \
            --repeats 5 --warmup 2 --no-progress --out "/tmp/stages/scaling/bench" ;;
    bench-vit)
        stage bench-vit 290 python3 -m dpspeed bench --model $VIT --precisions bf16 --peers opacus \
            --min-batch 32 --repeats 3 --warmup 1 --no-progress --out "/tmp/stages/bench-vit/bench" ;;
    bench-bit)
        stage bench-bit 240 python3 -m dpspeed bench --model $BIT --precisions bf16 --peers opacus \
            --min-batch 32 --repeats 3 --warmup 1 --no-progress --out "/tmp/stages/bench-bit/bench" ;;
    speed-tf32 | speed-fp32)
        p=${s#speed-}
        stage "$s" 70 python3 benchmarks/speed.py --models vit_base_patch16_224 --image-size 224 \
            --device cuda --precision $p --batch 64 --peers opacus --repeats 4 --warmup 1 \
            --out "/tmp/stages/$s/speed_vit_base_$p.json" ;;
    speed-bf16)
        stage speed-bf16 90 python3 benchmarks/speed.py --models vit_base_patch16_224 --image-size 224 \
            --device cuda --precision bf16 --batch 256 --modes per-example bk bk-mix-opt auto --repeats 4 --warmup 1 \
            --out /tmp/stages/speed-bf16/speed_vit_base_bf16.json ;;
    profile)
        stage profile 80 python3 benchmarks/profile_step.py --model timm:vit_base_patch16_224 --image-size 224 \
            --mode bk --batch 32 512 --precision bf16 --rows 30 ;;
    kernel)  # the fused ghost norm: correctness on CUDA, then its time against the torch path, then a step with it
        stage kernel 240 bash -c "python3 -m pytest -p no:cacheprovider -x -q tests/kernels && \
            for p in bf16 fp32; do python3 -m benchmarks.ghost_norm_kernel --device cuda --dtype \$p \
            --out /tmp/stages/kernel/ghost_norm_kernel_\$p.json; done && \
            DPSPEED_FUSED_GHOST_NORM=1 python3 benchmarks/speed.py --models vit_base_patch16_224 --image-size 224 \
            --device cuda --precision bf16 --batch 256 --modes bk --repeats 4 --warmup 1 \
            --out /tmp/stages/kernel/speed_vit_base_bf16_fused.json" ;;
    memory)  # the peak of one step per mode and style, ViT-base and BiT beside non-private (bf16, batch 64)
        stage memory 150 python3 -m benchmarks.step_memory --models vit_base_patch16_224 resnetv2_50x1_bit \
            --image-size 224 --batch 64 --precision bf16 --device cuda --out /tmp/stages/memory/step_memory_bf16.json ;;
    study-vit-* | study-bit-*)  # one model, one precision, every mode, the peers
        m=${s#study-}; m=${m%%-*}; p=${s##*-}
        [ "$m" = vit ] && model=$VIT || model=$BIT
        results "$s" "study-$m" 540 --model $model --precisions $p --peers opacus jax --min-batch 32 ;;
    size-vit-*)
        name=vit_${s#size-vit-}_patch16_224; [ "$s" = size-vit-huge ] && name=vit_huge_patch14_224
        results "$s" sizes-vit 540 --model "timm:$name" --image-size 224 --num-classes 100 \
            --precisions fp32 tf32 --modes per-example ghost mix-ghost bk bk-mix-opt auto --peers opacus jax \
            --min-batch 8 ;;
    size-bit-*)
        results "$s" sizes-bit 540 --model "timm:resnetv2_${s#size-bit-}_bit" --image-size 224 --num-classes 100 \
            --precisions fp32 tf32 --modes per-example ghost mix-ghost bk bk-mix-opt auto --peers opacus \
            --min-batch 8 ;;
    compile-vit)
        results compile-vit compile-vit 540 --model $VIT --precisions bf16 --modes bk auto --compile --min-batch 32 ;;
    *) echo "unknown stage $s"; exit 2 ;;
    esac
done
