//! The code-execution sandbox's cost: the start of a trivial program with and without it (its
//! overhead per program), and programs scored per second on every core, sandboxed and plain.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::eval::sandbox::{Limits, Sandbox};

/// A typical scored program: a small function and its asserts, as a code task runs them.
const PROGRAM: &str = "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\nassert merge_sorted([1, 4], [2, 3, 5]) == [1, 2, 3, 4, 5]\nassert merge_sorted([], [1]) == [1]\nassert merge_sorted([2, 2], [2]) == [2, 2, 2]\n";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `interpreter -I -B -c source` without a sandbox, as a baseline.
fn plain(interpreter: &std::path::Path, source: &str) -> Result<bool> {
    Command::new(interpreter)
        .args(["-I", "-B", "-c", source])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .map_err(|e| Error::invalid(format!("{}: {e}", interpreter.display())))
}

/// Programs per second over `threads` threads running `n` programs with `one`.
fn throughput(threads: usize, n: usize, one: &(dyn Fn() -> Result<bool> + Sync)) -> Result<f64> {
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    if !matches!(one(), Ok(true)) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    if failed.load(Ordering::Relaxed) > 0 {
        return Err(Error::invalid("a benchmark program failed"));
    }
    Ok(n as f64 / secs)
}

/// Measures the sandbox of `interpreter`: `runs` starts each way, then `programs` programs on
/// every core.
pub fn measure(interpreter: &str, runs: usize, programs: usize) -> Result<Value> {
    let sb = Sandbox::new(interpreter, Limits::default())?;
    let exe = sb.interpreter().to_path_buf();
    // Warm the page cache and the interpreter's imports.
    plain(&exe, "pass")?;
    sb.run_python("pass\n")?;
    let mut plain_ms = vec![];
    let mut boxed_ms = vec![];
    for _ in 0..runs {
        let t = Instant::now();
        plain(&exe, "pass")?;
        plain_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let e = sb.run_python("pass\n")?;
        if !e.passed() {
            return Err(Error::invalid(format!(
                "a trivial program failed: {}",
                e.reason()
            )));
        }
        boxed_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sandboxed = throughput(threads, programs, &|| {
        sb.run_python(PROGRAM).map(|e| e.passed())
    })?;
    let unboxed = throughput(threads, programs, &|| plain(&exe, PROGRAM))?;
    let (p, b) = (median(plain_ms), median(boxed_ms));
    Ok(json!({
        "op": "sandbox",
        "interpreter": exe,
        "enforced": sb.enforced(),
        "runs": runs,
        "plain_start_ms": p,
        "sandboxed_start_ms": b,
        "overhead_ms": b - p,
        "threads": threads,
        "programs": programs,
        "programs_per_second": sandboxed,
        "programs_per_second_plain": unboxed,
    }))
}
