#!/usr/bin/env bash
# The GPU checks owed by the CUDA backend, in one device call. Build here first (no Rust on the
# GPU machine), with nvcc so the kernel images are embedded (otherwise NVRTC compiles them there;
# nvcc from $NVCC, else the venv that .ci/run installs (.ci-cache/cuda-venv) or .cuda-venv):
#   scripts/gpu_checks.sh --stage gpu-bin      # builds, copies the binaries into gpu-bin/ (git-ignored)
# then, with `gpu-bin` carried to the device:
#   bash scripts/gpu_checks.sh --run gpu-bin   # logs and bench/demo/serve/torch JSON in gpu-out/
#                                              # (packed into $OUT/gpu-checks.tgz on the device)
set -euo pipefail
mode=${1:?--stage DIR or --run DIR}
dir=${2:?directory}
case "$mode" in
  --stage)
    rm -rf "$dir" && mkdir -p "$dir"
    # Every cargo call below sees the same nvcc: a build without it would replace the embedded
    # kernel images with none (build.rs reruns when NVCC changes).
    venv_nvcc=
    for candidate in .ci-cache/cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc \
                     .cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
      if [ -z "$venv_nvcc" ] && [ -x "$candidate" ]; then venv_nvcc=$candidate; fi
    done
    export NVCC=${NVCC:-$venv_nvcc} CYCLEQD_REQUIRE_KERNELS=1
    [ -n "$NVCC" ] || { echo "gpu_checks: no nvcc (set NVCC, or run .ci/run once to install one)" >&2; exit 1; }
    cargo build --release
    cp target/release/cycleqd-engine "$dir/"
    # Cargo names each test executable; the newest file in deps/ may be another target's.
    cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
wanted = {"cuda_parity", "llama_reference", "backend_checks", "cpu_isa", "cpu_amx"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or not m["profile"]["test"]:
        continue
    name, kind = m["target"]["name"], m["target"]["kind"]
    if kind == ["lib"]:
        shutil.copy(m["executable"], sys.argv[1] + "/unit_tests")
    elif kind == ["test"] and name in wanted:
        shutil.copy(m["executable"], sys.argv[1] + "/" + name)
' "$dir"
    for t in unit_tests cuda_parity llama_reference backend_checks cpu_isa cpu_amx; do
      [ -x "$dir/$t" ] || { echo "gpu_checks: no $t test executable built" >&2; exit 1; }
    done
    # The device call carries at most 64 MiB: drop symbols and debug info, and take only the Llama
    # reference data (the merge fixtures are not GPU checks).
    strip "$dir"/cycleqd-engine "$dir"/unit_tests "$dir"/cuda_parity "$dir"/llama_reference "$dir"/backend_checks \
      "$dir"/cpu_isa "$dir"/cpu_amx
    mkdir -p "$dir/testdata" && cp -r ../shared/testdata/llama "$dir/testdata/"
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$dir" "$exclude" 2>/dev/null || echo "/$dir" >> "$exclude"
    du -sh "$dir"
    ;;
  --run)
    # The device tool returns at most 8 files from $OUT: the logs go to a folder of their own,
    # packed into $OUT/gpu-checks.tgz after every step, so even a call cut short brings back
    # everything that finished.
    out=${GPU_CHECKS_DIR:-gpu-out}
    mkdir -p "$out"
    pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-checks.tgz" -C "$out" .; fi; }
    export CYCLEQD_TESTDATA="$PWD/$dir/testdata" CYCLEQD_BIN="$PWD/$dir/cycleqd-engine" LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"; } | tee "$out/device.txt"
    # The host CPU too: where it has AMX (Xeon Sapphire Rapids and later), the unit tests and
    # cpu_isa below run the AMX tiles against their emulation, which no dev machine can.
    { grep -m1 "model name" /proc/cpuinfo; echo "amx flags: $(grep -o -w -E 'amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"; } | tee -a "$out/device.txt"
    # Every step runs even when an earlier one fails (one device call must tell everything);
    # each failure is counted and named, and the script exits non-zero if there was any.
    failed=()
    step() {
      local name=$1 limit=$2 rc=0; shift 2
      echo "== $name" | tee -a "$out/steps.txt"
      # Each step has its own limit, so one that hangs cannot take the whole call with it.
      timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || rc=${PIPESTATUS[0]}
      if [ "$rc" -eq 0 ]; then
        echo "ok $name" | tee -a "$out/steps.txt"
      else
        echo "FAILED $name (exit $rc)" | tee -a "$out/steps.txt"
        failed+=("$name")
      fi
      pack
    }
    step unit_tests 60 "$dir/unit_tests" --test-threads 1
    step cuda_parity 120 "$dir/cuda_parity" --test-threads 1 --nocapture
    step llama_reference 30 "$dir/llama_reference"
    step backend_checks 30 "$dir/backend_checks"
    step amx_tiles 30 "$dir/unit_tests" backend::cpu::amx --nocapture
    step cpu_isa 120 "$dir/cpu_isa" --nocapture
    step cpu_amx 60 "$dir/cpu_amx" --nocapture
    step bench 150 "$dir/cycleqd-engine" bench --device cuda --out "$out/bench.json"
    step demo_bench 60 "$dir/cycleqd-engine" bench --op demo --device cuda --out "$out/demo.json"
    step serve_bench 60 "$dir/cycleqd-engine" bench --op serve --device cuda --out "$out/serve.json"
    step torch 120 python3 scripts/torch_side_by_side.py --engine "$out/bench.json" --out "$out/torch.json"
    # A GPU test that prints SKIPPED on a machine with a GPU did not run: that is a failure.
    if grep -h "SKIPPED" "$out/cuda_parity.txt" "$out/unit_tests.txt" "$out/backend_checks.txt" 2>/dev/null; then
      failed+=("skipped GPU tests")
    fi
    # A host CPU with AMX-BF16 whose tiles the engine would not use is a failure too: the
    # hardware-against-emulation test skipped where it should have run.
    if grep -qw amx_bf16 /proc/cpuinfo && grep -h "AMX tiles not usable" "$out/amx_tiles.txt" 2>/dev/null; then
      failed+=("AMX present but not used")
    fi
    if [ ${#failed[@]} -gt 0 ]; then
      echo "GPU checks failed: ${failed[*]}" | tee -a "$out/steps.txt"
      pack
      exit 1
    fi
    echo "all GPU checks passed" | tee -a "$out/steps.txt"
    pack
    ;;
  *) echo "usage: $0 --stage DIR | --run DIR" >&2; exit 2 ;;
esac
