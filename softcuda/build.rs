//! Builds the software device's runner: every `kernels/*.cu` of the project compiled as host
//! C++ with the softcuda shim, plus the runtime, linked into one executable under
//! AddressSanitizer and UndefinedBehaviorSanitizer (`$OUT_DIR/softcuda-runner`). The kernels
//! register themselves: each source is preprocessed once to find its `extern "C"` functions (the
//! kernels), and a copy of it gets one `SOFTCUDA_REGISTER(name)` line per kernel.
//!
//! The compiler is the `cc` crate's C++ compiler (so `CXX` is honoured). Where the sanitizer
//! runtimes are missing, the runner is built without them and says so (`SOFTCUDA_SANITIZERS`).
//! Writes only to `OUT_DIR`.

use std::path::PathBuf;
use std::process::Command;

const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let include = manifest.join("include");
    let kernels_dir = manifest.join("../kernels");
    let runtime = manifest.join("src/runtime.cc");
    println!("cargo:rerun-if-changed={}", include.display());
    println!("cargo:rerun-if-changed={}", runtime.display());
    println!("cargo:rerun-if-changed={}", kernels_dir.display());

    let compiler = cc::Build::new()
        .cpp(true)
        .cargo_metadata(false)
        .get_compiler();
    let base_flags = |cmd: &mut Command| {
        cmd.args([
            "-std=c++20",
            "-x",
            "c++",
            "-fno-strict-aliasing",
            "-pthread",
        ])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I{}", kernels_dir.display()));
    };

    let mut sources = vec![];
    let mut cus: Vec<PathBuf> = std::fs::read_dir(&kernels_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", kernels_dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cus.sort();
    // The device's own self-test kernels (not the engine's).
    cus.push(manifest.join("src/selftest.cu"));
    for cu in &cus {
        println!("cargo:rerun-if-changed={}", cu.display());
        let stem = cu.file_stem().unwrap().to_string_lossy().into_owned();
        let pre = out.join(format!("{stem}.i"));
        let mut cmd = compiler.to_command();
        base_flags(&mut cmd);
        cmd.arg("-E")
            .arg("-include")
            .arg(include.join("softcuda.h"))
            .arg(cu)
            .arg("-o")
            .arg(&pre);
        run(&mut cmd, "preprocessing a kernel source");
        let text = std::fs::read_to_string(&pre).unwrap();
        let names = kernel_names(&text);
        assert!(
            !names.is_empty(),
            "{}: no extern \"C\" kernels",
            cu.display()
        );
        let mut tu = format!(
            "#include \"softcuda.h\"\n#include \"{}\"\n#include \"softcuda_registry.h\"\n",
            cu.display()
        );
        for n in &names {
            tu.push_str(&format!("SOFTCUDA_REGISTER({n})\n"));
        }
        let path = out.join(format!("{stem}.softcuda.cc"));
        std::fs::write(&path, tu).unwrap();
        sources.push(path);
    }
    sources.push(runtime);

    let runner = out.join("softcuda-runner");
    let link = |sanitize: bool| {
        let mut cmd = compiler.to_command();
        base_flags(&mut cmd);
        cmd.args(["-O1", "-g"]);
        if sanitize {
            cmd.args(SANITIZE);
        }
        cmd.args(&sources).arg("-o").arg(&runner);
        cmd.status().map(|s| s.success()).unwrap_or(false)
    };
    let sanitizers = if link(true) {
        "address,undefined"
    } else {
        println!(
            "cargo:warning=softcuda: the sanitizer build failed (no libasan/libubsan?); the runner \
             is built without sanitizers"
        );
        if !link(false) {
            panic!(
                "softcuda: cannot build the runner with {:?}",
                compiler.path()
            );
        }
        "none"
    };
    println!("cargo:rustc-env=SOFTCUDA_RUNNER={}", runner.display());
    println!("cargo:rustc-env=SOFTCUDA_SANITIZERS={sanitizers}");
}

/// The `extern "C"` functions of preprocessed source: `extern "C" void NAME(`.
fn kernel_names(text: &str) -> Vec<String> {
    let mut names = vec![];
    let mut rest = text;
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + "extern \"C\"".len()..];
        let t = rest.trim_start();
        let Some(t) = t.strip_prefix("void") else {
            continue;
        };
        if !t.starts_with(char::is_whitespace) {
            continue;
        }
        let t = t.trim_start();
        let name: String = t
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && t[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names
}

fn run(cmd: &mut Command, what: &str) {
    let st = cmd
        .status()
        .unwrap_or_else(|e| panic!("softcuda: {what}: {e}"));
    assert!(st.success(), "softcuda: {what} failed: {cmd:?}");
}
