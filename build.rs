//! Compiles every `kernels/*.cu` to a fatbin (sm_90 machine code + compute_90 PTX) when an nvcc
//! is found and embeds it; always embeds the CUDA sources too, so a binary built without nvcc
//! can compile them at run time with NVRTC. `CYCLEQD_REQUIRE_KERNELS=1` makes a missing or
//! failing nvcc a build error (CI and release builds). ptxas's register and spill report is
//! written to `$OUT_DIR/ptxas.txt`.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: &str = "-gencode=arch=compute_90,code=[sm_90,compute_90]";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CYCLEQD_REQUIRE_KERNELS",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("CYCLEQD_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .expect("kernels/ is part of the crate")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();

    let nvcc = find_nvcc();
    if nvcc.is_none() {
        let msg = "no nvcc found ($NVCC, $CUDA_HOME/bin, PATH, /usr/local/cuda/bin): kernels are \
                   embedded as source only and compiled with NVRTC at run time";
        if require {
            panic!("CYCLEQD_REQUIRE_KERNELS=1: {msg}");
        }
        println!("cargo:warning={msg}");
    }

    let mut report = String::new();
    let mut table = String::from("pub const MODULES: &[KernelModule] = &[\n");
    for src in &sources {
        let name = src.file_stem().unwrap().to_str().unwrap();
        let fatbin = out_dir.join(format!("{name}.fatbin"));
        let built = match &nvcc {
            Some(nvcc) => compile(nvcc, src, &fatbin, &mut report, require),
            None => false,
        };
        let image = if built {
            format!("include_bytes!({:?})", fatbin.display().to_string())
        } else {
            "&[]".to_string()
        };
        let source = fs::canonicalize(src).unwrap();
        writeln!(
            table,
            "    KernelModule {{ name: {name:?}, fatbin: {image}, source: include_str!({:?}) }},",
            source.display().to_string()
        )
        .unwrap();
    }
    table.push_str("];\n");
    let common = fs::canonicalize("kernels/common.cuh").unwrap();
    writeln!(
        table,
        "pub const COMMON_HEADER: &str = include_str!({:?});",
        common.display().to_string()
    )
    .unwrap();
    fs::write(out_dir.join("kernels.rs"), table).unwrap();
    fs::write(out_dir.join("ptxas.txt"), report).unwrap();
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            candidates.push(Path::new(&home).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Compiles one kernel file; returns whether a fatbin was written.
fn compile(nvcc: &Path, src: &Path, out: &Path, report: &mut String, require: bool) -> bool {
    let output = Command::new(nvcc)
        .args([
            "--fatbin", ARCH, "-O3", "-Xptxas", "-v", "-I", "kernels", "-o",
        ])
        .arg(out)
        .arg(src)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("could not run {}: {e}", nvcc.display());
            if require {
                panic!("{msg}");
            }
            println!("cargo:warning={msg}");
            return false;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        // A kernel that does not compile is a build error whether or not kernels are required.
        panic!("nvcc failed on {}:\n{stderr}", src.display());
    }
    writeln!(report, "== {}", src.display()).unwrap();
    for line in stderr.lines() {
        if line.contains("Compiling entry") || line.contains("registers") || line.contains("spill")
        {
            writeln!(report, "{}", line.trim()).unwrap();
        }
    }
    true
}
