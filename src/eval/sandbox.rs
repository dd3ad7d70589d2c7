//! Runs untrusted programs (model completions with their tests) in a sandbox the operating
//! system enforces, never in the engine's process or with its rights:
//!
//! - a fresh temporary folder, the only place it may write (Landlock), its working directory;
//! - a scrubbed environment, stdin from /dev/null, no inherited descriptors;
//! - its own PID namespace (it cannot see or signal the engine; when it ends, everything it
//!   started ends) and network namespace (no interfaces but a down loopback), where the
//!   kernel allows them; Landlock also refuses TCP and signals outside the sandbox;
//! - rlimits on CPU time, address space, file size, open files and processes; where the
//!   engine runs as root (which ignores RLIMIT_NPROC), a pids and a memory cgroup beneath the
//!   engine's own bound the whole tree, and the program runs as `nobody` when that user can
//!   run the interpreter, else as root without capabilities;
//! - a wall-clock timeout after which the whole tree is killed, and captured output capped.
//!
//! What the kernel allows is probed once ([`Sandbox::new`]) and said ([`Sandbox::enforced`]):
//! a layer that is unavailable is reported, never silently assumed.
//!
//! Process structure: the engine forks a helper (its own process group, in the sandbox's
//! cgroups), which unshares the namespaces and forks the program as PID 1 of the new PID
//! namespace; the helper reports the program's wait status and exits. The code between fork
//! and exec uses only async-signal-safe system calls on data prepared before the fork.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Limits of one program.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Wall-clock time before the tree is killed.
    pub timeout: Duration,
    /// RLIMIT_CPU, seconds.
    pub cpu_seconds: u64,
    /// RLIMIT_AS per process, and the memory cgroup's limit for the tree.
    pub memory_bytes: u64,
    /// RLIMIT_FSIZE: the largest file it may write.
    pub file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub open_files: u64,
    /// RLIMIT_NPROC and the pids cgroup's limit.
    pub processes: u64,
    /// Bytes of stdout and of stderr kept (the rest is read and dropped).
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            cpu_seconds: 10,
            memory_bytes: 1 << 30,
            file_bytes: 16 << 20,
            open_files: 64,
            processes: 32,
            output_bytes: 64 << 10,
        }
    }
}

/// How a program ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Ending {
    Exited { code: i32 },
    Signaled { signal: i32 },
    TimedOut,
}

/// One program's run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Execution {
    pub ending: Ending,
    pub stdout: String,
    pub stderr: String,
    /// Whether output was cut at the cap.
    pub truncated: bool,
    pub seconds: f64,
}

impl Execution {
    /// Exited with status 0: every test passed.
    pub fn passed(&self) -> bool {
        self.ending == Ending::Exited { code: 0 }
    }

    /// Why it did not pass, in a few words.
    pub fn reason(&self) -> String {
        match &self.ending {
            Ending::Exited { code: 0 } => "passed".into(),
            Ending::Exited { code } => {
                let last = self.stderr.trim_end().lines().last().unwrap_or("");
                format!("exit {code}: {last}")
            }
            Ending::Signaled { signal } => {
                format!("killed by signal {signal}{}", signal_hint(*signal))
            }
            Ending::TimedOut => "timed out".into(),
        }
    }
}

fn signal_hint(sig: i32) -> &'static str {
    match sig {
        libc::SIGXCPU => " (CPU time limit)",
        libc::SIGXFSZ => " (file size limit)",
        libc::SIGKILL => " (killed: memory or process limit)",
        libc::SIGSEGV => " (segmentation fault)",
        _ => "",
    }
}

/// What this machine lets the sandbox enforce, probed once.
#[derive(Clone, Debug, Default)]
struct Layers {
    /// `CLONE_NEWPID | CLONE_NEWNET` (and `CLONE_NEWUSER` when not root), if they work.
    namespaces: libc::c_int,
    /// The Landlock ABI version (0: unavailable).
    landlock_abi: i32,
    /// Cgroup folders (pids, memory) the tree is placed beneath, when writable.
    cgroup_roots: Vec<(String, PathBuf)>,
    /// Run as `nobody` (the engine is root and `nobody` can run the interpreter).
    drop_to_nobody: bool,
    is_root: bool,
}

/// A sandbox for one interpreter.
pub struct Sandbox {
    interpreter: PathBuf,
    limits: Limits,
    layers: Layers,
    /// Where the programs' folders are made.
    scratch: PathBuf,
    /// Cgroups of finished programs, empty and ready for the next (making and removing a
    /// cgroup costs milliseconds; a program should not).
    idle_cgroups: std::sync::Mutex<Vec<CgroupSet>>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

const NOBODY: libc::uid_t = 65534;

impl Sandbox {
    /// A sandbox running `interpreter` (a name on PATH or a path; resolved once, through the
    /// interpreter's own `sys.executable` so that launcher scripts such as pyenv's shims are
    /// not run per program). Probes what the kernel allows.
    pub fn new(interpreter: &str, limits: Limits) -> Result<Sandbox> {
        let resolved = resolve_interpreter(interpreter)?;
        // One folder per sandbox (several may live in one process), removed with it.
        let scratch = std::env::temp_dir().join(format!(
            "cycleqd-sandbox-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
        // SAFETY: geteuid has no preconditions.
        let is_root = unsafe { libc::geteuid() } == 0;
        let mut sb = Sandbox {
            interpreter: resolved,
            limits,
            layers: Layers {
                is_root,
                landlock_abi: landlock_abi(),
                ..Layers::default()
            },
            scratch,
            idle_cgroups: std::sync::Mutex::default(),
        };
        if is_root {
            sb.layers.cgroup_roots = cgroup_roots();
        }
        // Namespaces: the strongest set the kernel accepts for a trivial program.
        let candidates: &[libc::c_int] = if is_root {
            &[
                libc::CLONE_NEWPID | libc::CLONE_NEWNET,
                libc::CLONE_NEWPID,
                0,
            ]
        } else {
            &[
                libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWNET,
                libc::CLONE_NEWUSER | libc::CLONE_NEWPID,
                0,
            ]
        };
        let mut last_err = None;
        for &ns in candidates {
            sb.layers.namespaces = ns;
            match sb.run_args(&["-c", "pass"], None) {
                Ok(e) if e.passed() => {
                    last_err = None;
                    break;
                }
                Ok(e) => last_err = Some(format!("a trivial program failed: {}", e.reason())),
                Err(e) => last_err = Some(e.to_string()),
            }
        }
        if let Some(e) = last_err {
            return Err(Error::invalid(format!(
                "sandbox: `{}` cannot run even without namespaces: {e}",
                sb.interpreter.display()
            )));
        }
        if is_root {
            sb.layers.drop_to_nobody = true;
            if !sb.run_args(&["-c", "pass"], None).is_ok_and(|e| e.passed()) {
                sb.layers.drop_to_nobody = false;
            }
        }
        Ok(sb)
    }

    pub fn interpreter(&self) -> &Path {
        &self.interpreter
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What is enforced here, and what is not, in one line.
    pub fn enforced(&self) -> String {
        let l = &self.layers;
        let mut on = vec!["own folder".to_string(), "scrubbed environment".into()];
        let mut off = vec![];
        if l.namespaces & libc::CLONE_NEWPID != 0 {
            on.push("PID namespace".into());
        } else {
            off.push("PID namespace (refused by the kernel)");
        }
        if l.namespaces & libc::CLONE_NEWNET != 0 {
            on.push("no network (network namespace)".into());
        } else if l.landlock_abi >= 4 {
            on.push("no TCP (Landlock; no network namespace here)".into());
        } else {
            off.push("network isolation (no network namespace, no Landlock ≥ 4)");
        }
        if l.landlock_abi > 0 {
            on.push(format!(
                "Landlock ABI {}: writes only in its folder",
                l.landlock_abi
            ));
        } else {
            off.push("write confinement (no Landlock in this kernel)");
        }
        on.push("rlimits (CPU, memory, file size, files, processes)".into());
        if l.is_root {
            if l.cgroup_roots.is_empty() {
                off.push("process count (root ignores RLIMIT_NPROC and no cgroup is writable)");
            } else {
                let names: Vec<&str> = l.cgroup_roots.iter().map(|(c, _)| c.as_str()).collect();
                on.push(format!("cgroups ({})", names.join(", ")));
            }
            if l.drop_to_nobody {
                on.push("runs as nobody".into());
            } else {
                on.push("root without capabilities (nobody cannot run the interpreter)".into());
            }
        }
        let mut s = format!("sandbox: {}", on.join(", "));
        if !off.is_empty() {
            s.push_str(&format!("; not enforced: {}", off.join(", ")));
        }
        s
    }

    /// Runs `program` (Python source) as `interpreter -I -B main.py` in a fresh folder.
    pub fn run_python(&self, program: &str) -> Result<Execution> {
        self.run_args(&["-I", "-B", "main.py"], Some(program))
    }

    /// Runs the interpreter with `args` in a fresh folder holding `main.py` (when given).
    fn run_args(&self, args: &[&str], program: Option<&str>) -> Result<Execution> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.scratch.join(format!("run-{n}"));
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let result = (|| {
            if let Some(p) = program {
                let f = dir.join("main.py");
                std::fs::write(&f, p).map_err(|e| Error::io(&f, e))?;
            }
            if self.layers.drop_to_nobody {
                chown_tree(&dir, NOBODY)?;
            }
            let idle = self.idle_cgroups.lock().ok().and_then(|mut v| v.pop());
            let cgroups = idle
                .unwrap_or_else(|| CgroupSet::create(&self.layers.cgroup_roots, n, &self.limits));
            let r = self.spawn_and_wait(&dir, args, &cgroups);
            if cgroups.is_empty() {
                if let Ok(mut v) = self.idle_cgroups.lock() {
                    v.push(cgroups);
                }
            } else {
                cgroups.remove();
            }
            r
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn spawn_and_wait(&self, dir: &Path, args: &[&str], cgroups: &CgroupSet) -> Result<Execution> {
        let start = Instant::now();
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let prep = Prepared::new(
            self,
            dir,
            args,
            cgroups,
            [out_w.as_raw_fd(), err_w.as_raw_fd(), status_w.as_raw_fd()],
        )?;
        // SAFETY: the child runs only async-signal-safe system calls on `prep` (built above)
        // and exits or execs; the parent closes its copies of the write ends.
        let helper = unsafe { libc::fork() };
        if helper < 0 {
            return Err(Error::invalid(format!(
                "sandbox: fork failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        if helper == 0 {
            // SAFETY: in the child of fork; never returns.
            unsafe {
                helper_main(
                    &prep,
                    out_w.as_raw_fd(),
                    err_w.as_raw_fd(),
                    status_w.as_raw_fd(),
                )
            }
        }
        drop((out_w, err_w, status_w));
        let deadline = start + self.limits.timeout;
        let mut reader = Reader::new([out_r, err_r, status_r], self.limits.output_bytes);
        let timed_out = !reader.read_until(deadline);
        if timed_out {
            // The helper's group (the helper, and the program unless it left the group), then
            // the helper itself: the program is PID 1 of its namespace and has SIGKILL as its
            // parent-death signal, so its whole tree goes with it; the cgroups catch the rest.
            // SAFETY: signalling our own child and its group.
            unsafe {
                libc::kill(-helper, libc::SIGKILL);
                libc::kill(helper, libc::SIGKILL);
            }
            cgroups.kill_all();
            reader.read_until(Instant::now() + Duration::from_millis(500));
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(helper, &mut status, 0) };
        let [stdout, stderr, report] = reader.into_parts();
        let seconds = start.elapsed().as_secs_f64();
        let truncated = stdout.1 || stderr.1;
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        if timed_out {
            return Ok(Execution {
                ending: Ending::TimedOut,
                stdout: text(stdout.0),
                stderr: text(stderr.0),
                truncated,
                seconds,
            });
        }
        let ending = parse_report(&report.0, &self.interpreter)?;
        Ok(Execution {
            ending,
            stdout: text(stdout.0),
            stderr: text(stderr.0),
            truncated,
            seconds,
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(v) = self.idle_cgroups.get_mut() {
            for c in v.drain(..) {
                c.remove();
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The helper's report: `W` + the program's wait status, or `E` + a setup step + errno.
fn parse_report(report: &[u8], interpreter: &Path) -> Result<Ending> {
    match report.first() {
        Some(b'W') if report.len() >= 5 => {
            let status = i32::from_le_bytes(report[1..5].try_into().expect("4 bytes"));
            if libc::WIFEXITED(status) {
                let code = libc::WEXITSTATUS(status);
                if code == EXEC_FAILED && report.len() >= 13 && &report[5..9] == b"EXEC" {
                    let errno = i32::from_le_bytes(report[9..13].try_into().expect("4 bytes"));
                    return Err(Error::invalid(format!(
                        "sandbox: cannot run {}: {}",
                        interpreter.display(),
                        std::io::Error::from_raw_os_error(errno)
                    )));
                }
                Ok(Ending::Exited { code })
            } else if libc::WIFSIGNALED(status) {
                Ok(Ending::Signaled {
                    signal: libc::WTERMSIG(status),
                })
            } else {
                Ok(Ending::Exited { code: -1 })
            }
        }
        Some(b'E') if report.len() >= 9 => {
            let step = i32::from_le_bytes(report[1..5].try_into().expect("4 bytes"));
            let errno = i32::from_le_bytes(report[5..9].try_into().expect("4 bytes"));
            Err(Error::invalid(format!(
                "sandbox: setting up ({}) failed: {}",
                step_name(step),
                std::io::Error::from_raw_os_error(errno)
            )))
        }
        _ => Err(Error::invalid(
            "sandbox: the helper process ended without a report",
        )),
    }
}

const EXEC_FAILED: i32 = 127;

fn step_name(step: i32) -> &'static str {
    match step {
        1 => "joining the cgroups",
        2 => "unsharing namespaces",
        3 => "mapping user ids",
        4 => "forking the program",
        _ => "an unknown step",
    }
}

/// Everything the forked processes need, built before the fork (they may not allocate).
struct Prepared {
    program: CString,
    /// The strings `argv_ptrs` and `envp_ptrs` point into (kept alive with them).
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    dir: CString,
    dev_null: CString,
    cgroup_procs: Vec<OwnedFd>,
    namespaces: libc::c_int,
    /// `/proc/self/{setgroups,uid_map,gid_map}` and their contents (non-root user namespace).
    id_maps: Vec<(CString, Vec<u8>)>,
    landlock: Option<OwnedFd>,
    drop_to_nobody: bool,
    is_root: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// The descriptors the helper keeps (sorted): its pipes, the cgroup files and the
    /// ruleset. Every other one is closed first thing, so that the pipes of programs other
    /// threads are starting do not stay open in this helper.
    keep: Vec<RawFd>,
}

impl Prepared {
    fn new(
        sb: &Sandbox,
        dir: &Path,
        args: &[&str],
        cgroups: &CgroupSet,
        pipes: [RawFd; 3],
    ) -> Result<Prepared> {
        let c =
            |s: &str| CString::new(s).map_err(|_| Error::invalid("sandbox: NUL in an argument"));
        let program = c(&sb.interpreter.display().to_string())?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(c(a)?);
        }
        let argv_ptrs = argv
            .iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        let d = dir.display().to_string();
        let envp: Vec<CString> = [
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            format!("HOME={d}"),
            format!("TMPDIR={d}"),
            "LANG=C.UTF-8".into(),
            "PYTHONHASHSEED=0".into(),
            "PYTHONDONTWRITEBYTECODE=1".into(),
            "PYTHONIOENCODING=utf-8".into(),
        ]
        .iter()
        .map(|s| c(s))
        .collect::<Result<_>>()?;
        let envp_ptrs = envp
            .iter()
            .map(|s| s.as_ptr())
            .chain([std::ptr::null()])
            .collect();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let id_maps = if sb.layers.namespaces & libc::CLONE_NEWUSER != 0 {
            vec![
                (c("/proc/self/setgroups")?, b"deny".to_vec()),
                (
                    c("/proc/self/uid_map")?,
                    format!("{uid} {uid} 1").into_bytes(),
                ),
                (
                    c("/proc/self/gid_map")?,
                    format!("{gid} {gid} 1").into_bytes(),
                ),
            ]
        } else {
            vec![]
        };
        let l = &sb.limits;
        let rlimits = vec![
            (libc::RLIMIT_CPU, l.cpu_seconds),
            (libc::RLIMIT_AS, l.memory_bytes),
            (libc::RLIMIT_FSIZE, l.file_bytes),
            (libc::RLIMIT_NOFILE, l.open_files),
            (libc::RLIMIT_NPROC, l.processes),
            (libc::RLIMIT_CORE, 0),
        ];
        let cgroup_procs = cgroups.procs_files();
        let landlock = landlock_ruleset(sb.layers.landlock_abi, dir);
        let mut keep: Vec<RawFd> = pipes.to_vec();
        keep.extend(cgroup_procs.iter().map(|f| f.as_raw_fd()));
        keep.extend(landlock.iter().map(|f| f.as_raw_fd()));
        keep.sort_unstable();
        Ok(Prepared {
            program,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            dir: c(&d)?,
            dev_null: c("/dev/null")?,
            cgroup_procs,
            namespaces: sb.layers.namespaces,
            id_maps,
            landlock,
            drop_to_nobody: sb.layers.drop_to_nobody,
            is_root: sb.layers.is_root,
            rlimits,
            keep,
        })
    }
}

/// Writes `bytes` to `fd` (best effort; async-signal-safe).
unsafe fn write_all(fd: RawFd, bytes: &[u8]) {
    let mut off = 0;
    while off < bytes.len() {
        let n = libc::write(fd, bytes[off..].as_ptr().cast(), bytes.len() - off);
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

/// Reports a failed setup step and exits.
unsafe fn fail(status_fd: RawFd, step: i32) -> ! {
    let errno = *libc::__errno_location();
    let mut msg = [0u8; 9];
    msg[0] = b'E';
    msg[1..5].copy_from_slice(&step.to_le_bytes());
    msg[5..9].copy_from_slice(&errno.to_le_bytes());
    write_all(status_fd, &msg);
    libc::_exit(126);
}

/// The decimal digits of `n` into `buf`, returning the used tail.
fn digits(mut n: u32, buf: &mut [u8; 12]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// The helper: joins the cgroups, unshares the namespaces, forks the program and reports its
/// wait status.
unsafe fn helper_main(p: &Prepared, out_w: RawFd, err_w: RawFd, status_w: RawFd) -> ! {
    let mut from: u32 = 0;
    for &fd in &p.keep {
        if fd as u32 > from {
            libc::syscall(libc::SYS_close_range, from.max(3), fd as u32 - 1, 0u32);
        }
        from = fd as u32 + 1;
    }
    libc::syscall(libc::SYS_close_range, from.max(3), u32::MAX, 0u32);
    libc::setpgid(0, 0);
    let mut buf = [0u8; 12];
    let pid = digits(libc::getpid() as u32, &mut buf);
    for fd in &p.cgroup_procs {
        if libc::write(fd.as_raw_fd(), pid.as_ptr().cast(), pid.len()) < 0 {
            fail(status_w, 1);
        }
    }
    if p.namespaces != 0 && libc::unshare(p.namespaces) != 0 {
        fail(status_w, 2);
    }
    for (path, content) in &p.id_maps {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
        if fd < 0 || libc::write(fd, content.as_ptr().cast(), content.len()) < 0 {
            fail(status_w, 3);
        }
        libc::close(fd);
    }
    // An exec failure of the program comes back on this pipe (closed on a successful exec).
    let mut exec_pipe = [0; 2];
    if libc::pipe2(exec_pipe.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
        fail(status_w, 4);
    }
    let child = libc::fork();
    if child < 0 {
        fail(status_w, 4);
    }
    if child == 0 {
        libc::close(exec_pipe[0]);
        program_main(p, out_w, err_w, exec_pipe[1]);
    }
    libc::close(exec_pipe[1]);
    libc::close(out_w);
    libc::close(err_w);
    let mut errno_bytes = [0u8; 4];
    let got = libc::read(exec_pipe[0], errno_bytes.as_mut_ptr().cast(), 4);
    let mut status = 0;
    while libc::waitpid(child, &mut status, 0) < 0 && *libc::__errno_location() == libc::EINTR {}
    let mut msg = [0u8; 13];
    msg[0] = b'W';
    msg[1..5].copy_from_slice(&status.to_le_bytes());
    let len = if got == 4 {
        msg[5..9].copy_from_slice(b"EXEC");
        msg[9..13].copy_from_slice(&errno_bytes);
        13
    } else {
        5
    };
    write_all(status_w, &msg[..len]);
    libc::_exit(0);
}

/// The program: PID 1 of its namespace, confined, then exec'd.
unsafe fn die(exec_w: RawFd) -> ! {
    let errno = *libc::__errno_location();
    write_all(exec_w, &errno.to_le_bytes());
    libc::_exit(EXEC_FAILED);
}

unsafe fn program_main(p: &Prepared, out_w: RawFd, err_w: RawFd, exec_w: RawFd) -> ! {
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    // No controlling terminal: it cannot read the user's keystrokes or write to their tty.
    libc::setsid();
    // Default signal dispositions and an empty mask, whatever the engine set.
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let null = libc::open(p.dev_null.as_ptr(), libc::O_RDONLY);
    if null < 0 || libc::dup2(null, 0) < 0 || libc::dup2(out_w, 1) < 0 || libc::dup2(err_w, 2) < 0 {
        die(exec_w);
    }
    // Every other descriptor closes at exec (the exec-error pipe stays open until then).
    libc::syscall(
        libc::SYS_close_range,
        3u32,
        u32::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    );
    if libc::chdir(p.dir.as_ptr()) != 0 {
        die(exec_w);
    }
    for &(res, v) in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        libc::setrlimit(res, &lim);
    }
    if p.is_root {
        if p.drop_to_nobody {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                die(exec_w);
            }
        } else {
            // Root without capabilities: nothing it may do beyond what its files allow.
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            let header = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            libc::syscall(libc::SYS_capset, &header, data.as_ptr());
        }
    }
    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if let Some(fd) = &p.landlock {
        if libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) != 0 {
            die(exec_w);
        }
    }
    libc::execve(
        p.program.as_ptr(),
        p.argv_ptrs.as_ptr(),
        p.envp_ptrs.as_ptr(),
    );
    die(exec_w);
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

// ---- Landlock ----

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: u32 = 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

/// The kernel's Landlock ABI version, 0 when it has none.
fn landlock_abi() -> i32 {
    // SAFETY: the version query takes no attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0) as i32
}

/// A ruleset allowing reads and execution everywhere and writes beneath `dir` only (plus
/// writing to /dev/null), refusing TCP (ABI ≥ 4), and scoping signals and abstract sockets to
/// the sandbox (ABI ≥ 6). `None` without Landlock.
fn landlock_ruleset(abi: i32, dir: &Path) -> Option<OwnedFd> {
    if abi < 1 {
        return None;
    }
    const EXECUTE: u64 = 1 << 0;
    const WRITE_FILE: u64 = 1 << 1;
    const READ_FILE: u64 = 1 << 2;
    const READ_DIR: u64 = 1 << 3;
    let mut all_fs: u64 = (1 << 13) - 1; // ABI 1: execute … make_sym
    if abi >= 2 {
        all_fs |= 1 << 13; // refer
    }
    if abi >= 3 {
        all_fs |= 1 << 14; // truncate
    }
    if abi >= 5 {
        all_fs |= 1 << 15; // ioctl_dev
    }
    let attr = RulesetAttr {
        handled_access_fs: all_fs,
        handled_access_net: if abi >= 4 { 0b11 } else { 0 }, // bind and connect TCP
        scoped: if abi >= 6 { 0b11 } else { 0 },             // abstract unix sockets, signals
    };
    let size = match abi {
        1..=3 => 8,
        4 | 5 => 16,
        _ => 24,
    };
    // SAFETY: `attr` outlives the call and `size` covers only fields the ABI knows.
    let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &attr, size, 0u32) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let rule = |path: &Path, access: u64| -> bool {
        let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: O_PATH open of an existing path; closed below.
        let pfd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if pfd < 0 {
            return false;
        }
        let attr = PathBeneath {
            allowed_access: access & all_fs,
            parent_fd: pfd,
        };
        // SAFETY: `attr` is a valid path-beneath rule for the ruleset.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                LANDLOCK_RULE_PATH_BENEATH,
                &attr,
                0u32,
            )
        };
        // SAFETY: closing the O_PATH descriptor opened above.
        unsafe { libc::close(pfd) };
        r == 0
    };
    let ok = rule(Path::new("/"), EXECUTE | READ_FILE | READ_DIR)
        && rule(dir, all_fs)
        && rule(Path::new("/dev/null"), READ_FILE | WRITE_FILE);
    ok.then_some(ruleset)
}

// ---- cgroups ----

/// The pids and memory cgroup folders of this process that a child cgroup can be made in
/// (root, cgroup v1 or v2), found through /proc/self/cgroup.
fn cgroup_roots() -> Vec<(String, PathBuf)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return vec![];
    };
    let mut out = vec![];
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let rel = path.trim_start_matches('/');
        for ctl in ["pids", "memory"] {
            if controllers.split(',').any(|c| c == ctl) {
                let dir = Path::new("/sys/fs/cgroup").join(ctl).join(rel);
                if dir.join("cgroup.procs").exists() && probe_cgroup(&dir) {
                    out.push((ctl.to_string(), dir));
                }
            }
        }
    }
    out
}

fn probe_cgroup(dir: &Path) -> bool {
    let probe = dir.join(format!("cycleqd-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

/// The cgroups of one program (empty where none is available).
struct CgroupSet {
    dirs: Vec<PathBuf>,
}

impl CgroupSet {
    fn create(roots: &[(String, PathBuf)], n: u64, limits: &Limits) -> CgroupSet {
        let mut dirs = vec![];
        for (ctl, root) in roots {
            let dir = root.join(format!("cycleqd-{}-{n}", std::process::id()));
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let ok = match ctl.as_str() {
                "pids" => {
                    std::fs::write(dir.join("pids.max"), limits.processes.to_string()).is_ok()
                }
                "memory" => {
                    // v1 names the limit memory.limit_in_bytes, v2 memory.max.
                    let v = limits.memory_bytes.to_string();
                    std::fs::write(dir.join("memory.limit_in_bytes"), &v).is_ok()
                        || std::fs::write(dir.join("memory.max"), &v).is_ok()
                }
                _ => false,
            };
            if ok {
                dirs.push(dir);
            } else {
                let _ = std::fs::remove_dir(&dir);
            }
        }
        CgroupSet { dirs }
    }

    fn procs_files(&self) -> Vec<OwnedFd> {
        self.dirs
            .iter()
            .filter_map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .ok()
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// Whether no process is left in its cgroups (then it can serve the next program).
    fn is_empty(&self) -> bool {
        self.dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|t| t.trim().is_empty())
        })
    }

    /// SIGKILLs every process still in the cgroups.
    fn kill_all(&self) {
        for d in &self.dirs {
            if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: signalling a process of the sandbox's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Removes the cgroups once their processes are gone (they are being killed: retried
    /// briefly).
    fn remove(&self) {
        for d in &self.dirs {
            for attempt in 0..50 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                if attempt == 10 {
                    self.kill_all();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

// ---- plumbing ----

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` receives two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::invalid(format!(
            "sandbox: pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads several pipes to their end (or a deadline) with poll, keeping at most `cap` bytes
/// of each.
struct Reader {
    fds: [Option<OwnedFd>; 3],
    data: [(Vec<u8>, bool); 3],
    cap: usize,
}

impl Reader {
    fn new(fds: [OwnedFd; 3], cap: usize) -> Reader {
        let [a, b, c] = fds;
        Reader {
            fds: [Some(a), Some(b), Some(c)],
            data: Default::default(),
            cap,
        }
    }

    /// Reads until every pipe is closed (true) or `deadline` passes (false).
    fn read_until(&mut self, deadline: Instant) -> bool {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let mut polls: Vec<libc::pollfd> = vec![];
            let mut which = vec![];
            for (i, f) in self.fds.iter().enumerate() {
                if let Some(f) = f {
                    polls.push(libc::pollfd {
                        fd: f.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push(i);
                }
            }
            if polls.is_empty() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `polls` is a valid array of pollfd.
            let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return false;
            }
            for (p, &i) in polls.iter().zip(&which) {
                if p.revents == 0 {
                    continue;
                }
                let fd = self.fds[i].as_ref().expect("polled").as_raw_fd();
                // SAFETY: reading into our own buffer.
                let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                if got <= 0 {
                    self.fds[i] = None;
                    continue;
                }
                let (kept, cut) = &mut self.data[i];
                let room = self.cap.saturating_sub(kept.len());
                let got = got as usize;
                kept.extend_from_slice(&buf[..got.min(room)]);
                if got > room {
                    *cut = true;
                }
            }
        }
    }

    fn into_parts(self) -> [(Vec<u8>, bool); 3] {
        self.data
    }
}

/// Makes `dir` and what is in it owned by `uid` (the program runs as that user).
fn chown_tree(dir: &Path, uid: libc::uid_t) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(entries.flatten().map(|e| e.path()));
    for p in paths {
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// The interpreter's real executable: `name` found on PATH (or a path), then asked for its
/// `sys.executable`, so a launcher script is resolved once.
fn resolve_interpreter(name: &str) -> Result<PathBuf> {
    let found = if name.contains('/') {
        let p = PathBuf::from(name);
        p.is_file().then_some(p)
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    let Some(found) = found else {
        return Err(Error::invalid(format!(
            "interpreter `{name}` not found (on PATH or as a path)"
        )));
    };
    let out = std::process::Command::new(&found)
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::invalid(format!("interpreter {}: {e}", found.display())))?;
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || exe.is_empty() {
        return Err(Error::invalid(format!(
            "interpreter {} does not run `import sys; print(sys.executable)`: {}",
            found.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::canonicalize(&exe).map_err(|e| Error::io(&exe, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_decimal() {
        let mut b = [0u8; 12];
        assert_eq!(digits(0, &mut b), b"0");
        assert_eq!(digits(4_294_967_295, &mut b), b"4294967295");
    }

    #[test]
    fn a_missing_interpreter_is_one_clear_error() {
        let e = Sandbox::new("no-such-python-xyz", Limits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`no-such-python-xyz` not found"), "{e}");
    }
}
