#!/usr/bin/env bash
# The checks that need a GPU, as one command for a GPU machine, within 10 minutes on a fresh one
# (each step has a time limit; they add up to 565 s): build the CUDA op, compare it with the PyTorch path
# (tests/test_ms_deform_attn.py), the engine's GPU tests (--amp, the synchronisations of a training
# step), time the op, the criterion, accumulated DAP steps, whole training steps (where the time
# goes, raw against DAP) and COCO evaluation, and last train end to end under torchrun with NCCL
# (DETR raw+DAP with the momentum AP-cost matcher, Deformable DETR two-stage with DAP and the CUDA
# op, both with --amp). One log per step in $OUT (or outputs/gpu_checks); every step runs even if
# an earlier one failed; exit 1 if any failed.
#   bash scripts/gpu_checks.sh
# PYTHON picks the interpreter (default python3, else python), TORCH_CUDA_ARCH_LIST the build
# (default: the visible GPU). Wheels in .whl/ (pycocotools and hotcoco, which engine.py needs;
# ultrafast-pycocotools and faster-coco-eval for the evaluation benchmark) are installed to
# /tmp/site first, for machines that cannot reach a package index.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-outputs/gpu_checks}"
mkdir -p "$out"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, its output in $out/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1; then
    echo "ok      $name ($((SECONDS - start)) s)"
  else
    echo "FAILED  $name ($((SECONDS - start)) s, limit $limit s); the end of $out/$name.log:"
    tail -n 25 "$out/$name.log"
    failed=1
  fi
}

tiny=(--backbone resnet18 --no_pretrained_backbone --hidden_dim 64 --dim_feedforward 128 --nheads 2
      --enc_layers 2 --dec_layers 3 --input_scale 0.25 --num_workers 2 --batch_size 4 --epochs 2
      --device cuda --amp --coco_path "$out/coco")
torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 main.py)

step device 20 "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
step build 120 env PYTHON="$PYTHON" bash models/ops/make.sh --inplace
step test_ms_deform_attn 60 "$PYTHON" -m pytest -q -rs tests/test_ms_deform_attn.py
step test_engine 60 "$PYTHON" -m pytest -q -rs tests/test_engine.py
step bench_ms_deform_attn 30 "$PYTHON" -m benchmarks.ms_deform_attn
step bench_criterion 45 "$PYTHON" -m benchmarks.criterion --device cuda --models detr deformable_detr
step bench_accumulation 30 "$PYTHON" -m benchmarks.accumulation --device cuda
step bench_step_profile 60 "$PYTHON" -m benchmarks.step_profile --device cuda --batch_size 4 --repeats 5
step bench_coco_eval 30 "$PYTHON" -m benchmarks.coco_eval --sizes 500
step data 20 "$PYTHON" -c "from datasets.synthetic import make_synthetic_coco as m; m('$out/coco', 32, 8, 160)"
step nccl_detr 45 "${torchrun[@]}" "${tiny[@]}" --loss raw+dap --matcher dap --dap_cost_mode momentum \
  --output_dir "$out/nccl_detr"
step nccl_deformable 45 "${torchrun[@]}" "${tiny[@]}" --model deformable_detr --with_box_refine --two_stage \
  --num_queries 50 --loss dap --output_dir "$out/nccl_deformable"
exit $failed
