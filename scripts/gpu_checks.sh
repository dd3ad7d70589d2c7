#!/usr/bin/env bash
# The GPU checks owed by the CUDA backend, in one device call. Build here first (no Rust on the
# GPU machine), with nvcc so the kernel images are embedded (otherwise NVRTC compiles them there):
#   export NVCC=$PWD/.cuda-venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc CYCLEQD_REQUIRE_KERNELS=1
#   cargo build --release && cargo test --release --no-run
#   scripts/gpu_checks.sh --stage gpu-bin      # copies the binaries into gpu-bin/ (git-ignored)
# then, with `gpu-bin` carried to the device:
#   bash scripts/gpu_checks.sh --run gpu-bin   # writes $OUT/{tests.txt,bench.json,demo.json,serve.json,torch.json}
set -euo pipefail
mode=${1:?--stage DIR or --run DIR}
dir=${2:?directory}
case "$mode" in
  --stage)
    mkdir -p "$dir"
    cp target/release/cycleqd-engine "$dir/"
    for t in cuda_parity llama_reference backend_checks; do
      bin=$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)
      cp "$bin" "$dir/$t"
    done
    lib=$(ls -t target/release/deps/cycleqd_engine-* | grep -v '\.\(d\|rlib\|rmeta\)$' | head -1)
    cp "$lib" "$dir/unit_tests"
    # The device call carries at most 64 MiB: drop debug info, and take only the Llama
    # reference data (the merge fixtures are not GPU checks).
    strip --strip-debug "$dir"/*
    mkdir -p "$dir/testdata" && cp -r ../shared/testdata/llama "$dir/testdata/"
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$dir" "$exclude" 2>/dev/null || echo "/$dir" >> "$exclude"
    du -sh "$dir"
    ;;
  --run)
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    export CYCLEQD_TESTDATA="$PWD/$dir/testdata" CYCLEQD_BIN="$PWD/$dir/cycleqd-engine" LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
    # Every step runs even when an earlier one fails (one device call must tell everything);
    # each failure is counted and named, and the script exits non-zero if there was any.
    failed=()
    step() {
      local name=$1 rc=0; shift
      echo "== $name" | tee -a "$out/steps.txt"
      "$@" 2>&1 | tee "$out/$name.txt" || rc=${PIPESTATUS[0]}
      if [ "$rc" -eq 0 ]; then
        echo "ok $name" | tee -a "$out/steps.txt"
      else
        echo "FAILED $name (exit $rc)" | tee -a "$out/steps.txt"
        failed+=("$name")
      fi
    }
    step unit_tests "$dir/unit_tests" --test-threads 1
    step cuda_parity "$dir/cuda_parity" --test-threads 1 --nocapture
    step llama_reference "$dir/llama_reference"
    step backend_checks "$dir/backend_checks"
    step bench "$dir/cycleqd-engine" bench --device cuda --out "$out/bench.json"
    step demo_bench "$dir/cycleqd-engine" bench --op demo --device cuda --out "$out/demo.json"
    step serve_bench "$dir/cycleqd-engine" bench --op serve --device cuda --out "$out/serve.json"
    step torch python3 scripts/torch_side_by_side.py --engine "$out/bench.json" --out "$out/torch.json"
    # A GPU test that prints SKIPPED on a machine with a GPU did not run: that is a failure.
    if grep -h "^SKIPPED" "$out/cuda_parity.txt" "$out/unit_tests.txt" "$out/backend_checks.txt" 2>/dev/null; then
      failed+=("skipped GPU tests")
    fi
    if [ ${#failed[@]} -gt 0 ]; then
      echo "GPU checks failed: ${failed[*]}" | tee -a "$out/steps.txt"
      exit 1
    fi
    echo "all GPU checks passed" | tee -a "$out/steps.txt"
    ;;
  *) echo "usage: $0 --stage DIR | --run DIR" >&2; exit 2 ;;
esac
