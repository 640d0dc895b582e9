#!/usr/bin/env bash
# The checks that need a GPU, as one command for a GPU machine: build the CUDA op, compare it
# with the PyTorch path (tests/test_ms_deform_attn.py), train with --amp on CUDA
# (tests/test_engine.py), and time the op, the criterion, accumulated DAP steps, whole training
# steps (where the time goes, raw against DAP) and COCO evaluation on the machine's CPUs. One log per
# step in $OUT (or outputs/gpu_checks); every step runs even if an earlier one failed; exit 1 if
# any failed.
#   bash scripts/gpu_checks.sh
# PYTHON picks the interpreter (default python3), TORCH_CUDA_ARCH_LIST the build (default 9.0,
# Hopper). Wheels in .whl/ (pycocotools and hotcoco, which engine.py needs; ultrafast-pycocotools
# and faster-coco-eval for the evaluation benchmark) are installed to /tmp/site first, for machines
# that cannot reach a package index.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-outputs/gpu_checks}"
mkdir -p "$out"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

failed=0
step() {  # step NAME COMMAND...: run it, its output in $out/NAME.log
  local name=$1 start=$SECONDS
  shift
  if "$@" > "$out/$name.log" 2>&1; then
    echo "ok      $name ($((SECONDS - start)) s)"
  else
    echo "FAILED  $name ($((SECONDS - start)) s); the end of $out/$name.log:"
    tail -n 25 "$out/$name.log"
    failed=1
  fi
}

step device "$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
step build env PYTHON="$PYTHON" bash models/ops/make.sh --inplace
step test_ms_deform_attn "$PYTHON" -m pytest -q -rs tests/test_ms_deform_attn.py
step test_engine "$PYTHON" -m pytest -q -rs tests/test_engine.py
step bench_ms_deform_attn "$PYTHON" -m benchmarks.ms_deform_attn
step bench_criterion "$PYTHON" -m benchmarks.criterion --device cuda --models detr deformable_detr
step bench_accumulation "$PYTHON" -m benchmarks.accumulation --device cuda
step bench_step_profile "$PYTHON" -m benchmarks.step_profile --device cuda --batch_size 4 --repeats 5
step bench_coco_eval "$PYTHON" -m benchmarks.coco_eval --sizes 500 5000
exit $failed
