//! A software CUDA device for tests. The project's kernels (`kernels/*.cu`), compiled as host
//! C++ with the softcuda shim under AddressSanitizer and UndefinedBehaviorSanitizer, run in a
//! child process ([`Device`]) one launch at a time: one host thread per CUDA thread, real
//! barriers for `__syncthreads`, per-warp exchange for the shuffles, `__shared__` storage
//! poisoned before every block, blocks in a shuffled order when asked, every buffer allocated
//! at its exact size so an out-of-bounds access is a sanitizer report, and every argument's
//! size checked against the kernel's parameter.
//!
//! What it proves: the kernels' arithmetic and indexing for the launches given, memory safety
//! within the buffers, independence from block order, barrier discipline. What it cannot:
//! real warp scheduling (lanes do not run in lockstep here), the GPU memory model and its
//! races between blocks, cuBLAS, and speed.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// Which sanitizers the runner was built with (`address,undefined`, or `none` where the
/// compiler lacked them).
pub const SANITIZERS: &str = env!("SOFTCUDA_SANITIZERS");

/// One kernel argument.
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    /// A pointer into buffer `buf`, `offset` bytes in.
    Buf { buf: usize, offset: usize },
    /// A value passed by copy (its bytes, little-endian).
    Scalar(Vec<u8>),
    /// A struct by value whose pointer fields (byte offset `at`) point into buffers.
    Struct {
        bytes: Vec<u8>,
        pointers: Vec<(usize, usize, usize)>,
    },
}

/// A launch's geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    /// 0: blocks in order; otherwise the seed of a shuffled order.
    pub order_seed: u64,
}

/// A kernel the runner holds, with the byte size of each of its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: String,
    pub param_sizes: Vec<usize>,
}

/// The runner process.
pub struct Device {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Device {
    /// Starts the runner.
    pub fn start() -> Result<Device, String> {
        let mut child = Command::new(env!("SOFTCUDA_RUNNER"))
            // Leaks are not what this checks, and a leak report at exit would hide the status.
            .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
            .env("UBSAN_OPTIONS", "print_stacktrace=1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("softcuda: cannot start the runner: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        Ok(Device {
            child,
            stdin,
            stdout,
        })
    }

    /// Every kernel the runner was built with.
    pub fn kernels(&mut self) -> Result<Vec<Kernel>, String> {
        self.send(&2u32.to_le_bytes())?;
        let n = self.u32()?;
        (0..n)
            .map(|_| {
                let name = self.string()?;
                let k = self.u32()?;
                let param_sizes = (0..k)
                    .map(|_| self.u32().map(|v| v as usize))
                    .collect::<Result<_, _>>()?;
                Ok(Kernel { name, param_sizes })
            })
            .collect()
    }

    /// Runs kernel `name` over `bufs` (device memory: written back when the launch ends).
    /// An error carries the runner's message, or its sanitizer report when it died (the
    /// device is restarted for the next launch).
    pub fn launch(
        &mut self,
        name: &str,
        geometry: &Geometry,
        args: &[Arg],
        bufs: &mut [Vec<u8>],
    ) -> Result<(), String> {
        let mut req = vec![];
        let put32 = |r: &mut Vec<u8>, v: u32| r.extend_from_slice(&v.to_le_bytes());
        let put64 = |r: &mut Vec<u8>, v: u64| r.extend_from_slice(&v.to_le_bytes());
        put32(&mut req, 1);
        put32(&mut req, name.len() as u32);
        req.extend_from_slice(name.as_bytes());
        for v in geometry.grid.iter().chain(&geometry.block) {
            put32(&mut req, *v);
        }
        put32(&mut req, geometry.shared_bytes);
        put64(&mut req, geometry.order_seed);
        put32(&mut req, bufs.len() as u32);
        for b in bufs.iter() {
            put64(&mut req, b.len() as u64);
            req.extend_from_slice(b);
        }
        put32(&mut req, args.len() as u32);
        for a in args {
            match a {
                Arg::Buf { buf, offset } => {
                    req.push(1);
                    put32(&mut req, *buf as u32);
                    put64(&mut req, *offset as u64);
                }
                Arg::Scalar(bytes) => {
                    req.push(2);
                    put32(&mut req, bytes.len() as u32);
                    req.extend_from_slice(bytes);
                }
                Arg::Struct { bytes, pointers } => {
                    req.push(3);
                    put32(&mut req, bytes.len() as u32);
                    req.extend_from_slice(bytes);
                    put32(&mut req, pointers.len() as u32);
                    for &(at, buf, offset) in pointers {
                        put32(&mut req, at as u32);
                        put32(&mut req, buf as u32);
                        put64(&mut req, offset as u64);
                    }
                }
            }
        }
        self.send(&req)?;
        match self.u32()? {
            0 => {
                for b in bufs.iter_mut() {
                    let len = self.u64()? as usize;
                    if len != b.len() {
                        return Err(format!(
                            "softcuda: buffer of {len} bytes back, {} sent",
                            b.len()
                        ));
                    }
                    self.read(b)?;
                }
                Ok(())
            }
            _ => Err(format!("softcuda: {name}: {}", self.string()?)),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self.stdin.write_all(bytes).and_then(|_| self.stdin.flush()) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.died()),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), String> {
        match self.stdout.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(_) => Err(self.died()),
        }
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string(&mut self) -> Result<String, String> {
        let mut s = vec![0u8; self.u32()? as usize];
        self.read(&mut s)?;
        Ok(String::from_utf8_lossy(&s).into_owned())
    }

    /// The runner ended mid-request: its stderr (the sanitizer's report), and a fresh runner.
    fn died(&mut self) -> String {
        let status = self.child.wait().ok();
        let mut report = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut report);
        }
        let why = format!(
            "softcuda: the runner died ({}):\n{}",
            status.map_or("?".into(), |s| s.to_string()),
            report.trim_end()
        );
        if let Ok(fresh) = Device::start() {
            *self = fresh;
        }
        why
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(&3u32.to_le_bytes());
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}
