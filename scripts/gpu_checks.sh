#!/usr/bin/env bash
# The GPU checks owed by the CUDA backend, in one device call. Build here first (no Rust on the
# GPU machine), with nvcc so the kernel images are embedded (otherwise NVRTC compiles them there):
#   export NVCC=$PWD/.cuda-venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc CYCLEQD_REQUIRE_KERNELS=1
#   cargo build --release && cargo test --release --no-run
#   scripts/gpu_checks.sh --stage gpu-bin      # copies the binaries into gpu-bin/ (git-ignored)
# then, with `gpu-bin` carried to the device:
#   bash scripts/gpu_checks.sh --run gpu-bin   # writes $OUT/{tests.txt,bench.json,torch.json}
set -euo pipefail
mode=${1:?--stage DIR or --run DIR}
dir=${2:?directory}
case "$mode" in
  --stage)
    mkdir -p "$dir"
    cp target/release/cycleqd-engine "$dir/"
    for t in cuda_parity llama_reference; do
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
    {
      "$dir/unit_tests" --test-threads 1 2>&1 || true
      "$dir/cuda_parity" --test-threads 1 --nocapture 2>&1 || true
      "$dir/llama_reference" 2>&1 || true
    } | tee "$out/tests.txt"
    "$dir/cycleqd-engine" bench --device cuda --out "$out/bench.json" 2>&1 | tee "$out/bench.txt"
    python3 scripts/torch_side_by_side.py --engine "$out/bench.json" --out "$out/torch.json" 2>&1 | tee "$out/torch.txt"
    ;;
  *) echo "usage: $0 --stage DIR | --run DIR" >&2; exit 2 ;;
esac
