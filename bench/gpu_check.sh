#!/usr/bin/env bash
# One-call GPU check: versions, the CUDA tests, the kernel benchmark (+ launch-shape sweep).
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/out)
#
# SWEEP=0 skips the launch-shape sweep. Runs on a bare GPU machine with torch + triton installed (no network): dinofuse is put on
# the import path from this checkout; wheels in .whl/ (if any) are installed to /tmp/site.
# DINOFUSE_COMMIT names the commit where the copy has no .git. Each stage has its own time limit and writes its log into OUT_DIR as it goes, so a stage
# that fails or runs long still leaves the others' results.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-$repo/bench/out}}
mkdir -p "$out"
cd "$repo" || exit 1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

# dinofuse.<pkg> -> top-level folders, as the setuptools package-dir mapping does
site=/tmp/dinofuse-path
mkdir -p "$site/dinofuse"
for pkg in engine kernels dataloading bench; do ln -sfn "$repo/$pkg" "$site/dinofuse/$pkg"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "commit ${DINOFUSE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} 2>&1 | tee "$out/env.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "stage $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/stages.txt"
  return $rc
}

stage cuda_tests "${CUDA_TESTS_S:-240}" python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider --no-header -rfE
sweep=--sweep; [ "${SWEEP:-1}" = 0 ] && sweep=
stage kernel_bench "${BENCH_S:-420}" python3 -m dinofuse.bench.kernels --out "$out" $sweep ${BENCH_ARGS:-}

echo
tail -n 3 "$out/cuda_tests.log"
cat "$out/stages.txt"
[ -f "$out/kernels.md" ] && cat "$out/kernels.md"
