//! The code-execution sandbox against hostile programs: each ends within its limits without
//! passing, and leaves the engine and the machine as they were (no process left, no file
//! written outside, the test process alive, no connection made).

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use cycleqd_engine::eval::sandbox::{Ending, Limits, Sandbox};

/// The tests count this process's descendants: they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn sandbox() -> Sandbox {
    let limits = Limits {
        timeout: Duration::from_secs(4),
        cpu_seconds: 2,
        memory_bytes: 512 << 20,
        processes: 16,
        output_bytes: 4096,
        ..Limits::default()
    };
    let sb = Sandbox::new("python3", limits).expect("python3 runs in the sandbox");
    println!("{}", sb.enforced());
    sb
}

/// Processes whose parent chain leads to this test process (its descendants).
fn descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // pid (comm) state ppid …: comm may hold spaces, so split after the last ')'.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                    parent.insert(pid, ppid);
                }
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..64 {
                match parent.get(&cur) {
                    Some(&pp) if pp == me => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

#[test]
fn a_passing_and_a_failing_program() {
    let _one = serial();
    let sb = sandbox();
    let ok = sb
        .run_python("assert sum([1, 2]) == 3\nprint('fine')\n")
        .unwrap();
    assert!(ok.passed(), "{ok:?}");
    assert_eq!(ok.stdout, "fine\n");
    let bad = sb
        .run_python("def f(x):\n    return x\nassert f(1) == 2\n")
        .unwrap();
    assert!(!bad.passed());
    assert_eq!(bad.ending, Ending::Exited { code: 1 });
    assert!(bad.reason().contains("AssertionError"), "{}", bad.reason());
    let syntax = sb.run_python("def f(:\n").unwrap();
    assert!(!syntax.passed() && syntax.stderr.contains("SyntaxError"));
}

#[test]
fn the_environment_is_scrubbed_and_the_folder_fresh() {
    let _one = serial();
    let sb = sandbox();
    let e = sb
        .run_python(
            "import os, json\nprint(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd(), \
             'files': sorted(os.listdir('.'))}))\n",
        )
        .unwrap();
    assert!(e.passed(), "{e:?}");
    let v: serde_json::Value = serde_json::from_str(e.stdout.trim()).unwrap();
    let env: Vec<&str> = v["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    for k in &env {
        assert!(
            [
                "PATH",
                "HOME",
                "TMPDIR",
                "LANG",
                "PYTHONHASHSEED",
                "PYTHONDONTWRITEBYTECODE",
                "PYTHONIOENCODING",
                "LC_CTYPE"
            ]
            .contains(k),
            "unexpected variable {k} in {env:?}"
        );
    }
    assert_eq!(v["files"], serde_json::json!(["main.py"]));
}

#[test]
fn endless_loops_are_stopped() {
    let _one = serial();
    let sb = sandbox();
    let t = Instant::now();
    let spin = sb.run_python("while True:\n    pass\n").unwrap();
    assert!(!spin.passed());
    assert!(
        matches!(spin.ending, Ending::Signaled { .. } | Ending::TimedOut),
        "{:?}",
        spin.ending
    );
    let sleep = sb.run_python("import time\ntime.sleep(60)\n").unwrap();
    assert_eq!(sleep.ending, Ending::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
}

#[test]
fn a_fork_bomb_ends_and_leaves_no_process() {
    let _one = serial();
    let sb = sandbox();
    let t = Instant::now();
    let e = sb
        .run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
        .unwrap();
    assert!(!e.passed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Nothing it started outlives it, and this process can still start processes.
    std::thread::sleep(Duration::from_millis(200));
    let left = descendants();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_program_that_daemonises_is_ended_with_its_tree() {
    let _one = serial();
    let sb = sandbox();
    let t = Instant::now();
    // The parent exits at once; its child sleeps holding stdout.
    let e = sb
        .run_python("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nprint('parent done')\n")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(e.stdout.contains("parent done"), "{e:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(descendants().is_empty(), "{:?}", descendants());
}

#[test]
fn memory_hogs_fail() {
    let _one = serial();
    let sb = sandbox();
    let e = sb
        .run_python("x = bytearray(4 << 30)\nprint(len(x))\n")
        .unwrap();
    assert!(!e.passed(), "{e:?}");
    let grow = sb
        .run_python("x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n")
        .unwrap();
    assert!(!grow.passed(), "{grow:?}");
}

#[test]
fn writes_outside_its_folder_are_refused() {
    let _one = serial();
    let sb = sandbox();
    let outside = std::env::temp_dir().join(format!("cycleqd-escape-{}", std::process::id()));
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let home_file =
        std::path::Path::new(&home).join(format!(".cycleqd-escape-{}", std::process::id()));
    for target in [&outside, &home_file] {
        let program = format!("open({:?}, 'w').write('x')\n", target.display().to_string());
        let e = sb.run_python(&program).unwrap();
        assert!(!e.passed(), "{}: {e:?}", target.display());
        assert!(!target.exists(), "{} was written", target.display());
    }
    // Its own folder is writable.
    let ok = sb
        .run_python(
            "open('out.txt', 'w').write('x')\nimport os\nassert os.path.getsize('out.txt') == 1\n",
        )
        .unwrap();
    assert!(ok.passed(), "{ok:?}");
    // A file over the size limit is cut off.
    let big = sb
        .run_python("open('big', 'wb').write(b'x' * (64 << 20))\n")
        .unwrap();
    assert!(!big.passed(), "{big:?}");
}

#[test]
fn no_network() {
    let _one = serial();
    let sb = sandbox();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let e = sb
        .run_python(&format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'escaped')\n"
        ))
        .unwrap();
    assert!(!e.passed(), "{e:?}");
    match listener.accept() {
        Ok((mut c, _)) => {
            let mut got = String::new();
            let _ = c.read_to_string(&mut got);
            panic!("the sandbox connected out and sent {got:?}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
    }
}

#[test]
fn killing_the_parent_or_everything_fails() {
    let _one = serial();
    let sb = sandbox();
    let me = std::process::id();
    for attempt in [
        format!("os.kill({me}, signal.SIGKILL)"),
        "os.kill(os.getppid(), signal.SIGKILL)".to_string(),
        "os.kill(-1, signal.SIGKILL)".to_string(),
        "os.killpg(0, signal.SIGKILL)".to_string(),
        format!("os.killpg({me}, signal.SIGKILL)"),
    ] {
        let program = format!(
            "import os, signal\ntry:\n    {attempt}\nexcept OSError as e:\n    print('refused', e)\n"
        );
        // The helper that reports the program's end survived (an Err would mean it did
        // not), and so did this process, which is checking.
        let e = sb.run_python(&program);
        assert!(e.is_ok(), "{attempt}: {e:?}");
    }
    assert!(sb.run_python("pass\n").unwrap().passed());
}

#[test]
fn huge_output_is_capped() {
    let _one = serial();
    let sb = sandbox();
    let t = Instant::now();
    let e = sb
        .run_python("import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 100000)\n")
        .unwrap();
    assert!(e.truncated && e.stdout.len() <= 4096, "{}", e.stdout.len());
    assert!(t.elapsed() < Duration::from_secs(10));
}
