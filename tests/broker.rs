//! Several nodes through a real Redis: each test starts its own `redis-server` on a free
//! loopback port (persistence off) and stops it. A coordinator and worker processes finish the
//! demo and end with the archives of a single process at the same `batch`, through a worker
//! SIGKILLed mid-child and a coordinator SIGKILLed and restarted; garbage on the streams is
//! dead-lettered; passwords and TLS work and the password is never written anywhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_same_archives, bin, demo, events, read, run_with, set_key, stderr, with_evolution,
};

/// A `redis-server` of this test's own.
struct Redis {
    child: Child,
    port: u16,
    password: Option<String>,
    tls: Option<PathBuf>,
}

impl Redis {
    fn start(password: Option<&str>, tls: Option<&Path>) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(dir) => {
                let p = |f: &str| dir.join(f).display().to_string();
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .args([
                        "--tls-cert-file",
                        &p("server.crt"),
                        "--tls-key-file",
                        &p("server.key"),
                    ])
                    .args([
                        "--tls-ca-cert-file",
                        &p("ca.crt"),
                        "--tls-auth-clients",
                        "no",
                    ]);
            }
        }
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (.ci/run installs it: apt-get install redis-server)");
        let r = Redis {
            child,
            port,
            password: password.map(String::from),
            tls: tls.map(Path::to_path_buf),
        };
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        // TLS certificates name "localhost".
        let host = if self.tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{auth}{host}:{}/0", self.port)
    }

    fn env(&self, cmd: &mut Command) {
        if let Some(dir) = &self.tls {
            cmd.env("CYCLEQD_BROKER_CA", dir.join("ca.crt"));
        }
    }

    fn conn(&self) -> redis::Connection {
        let url: cycleqd_engine::broker::BrokerUrl = self.url().parse().unwrap();
        if let Some(dir) = &self.tls {
            std::env::set_var("CYCLEQD_BROKER_CA", dir.join("ca.crt"));
        }
        url.connect().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo for a broker: a few children in batches of 4, checkpoints often, a short
/// visibility timeout.
fn broker_demo(dir: &Path) -> PathBuf {
    demo(dir, |t| {
        let t = set_key(set_key(t, "generations", "36"), "checkpoint_every", "8");
        with_evolution(t, "batch = 4\nvisibility_timeout_s = 2")
    })
}

fn spawn(args: &[&str], env: &[(&str, &str)], redis: &Redis, log: &Path) -> Child {
    let mut cmd = bin();
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    redis.env(&mut cmd);
    cmd.spawn().unwrap()
}

/// Waits until the coordinator has published run `name`.
fn wait_published(redis: &Redis, name: &str) {
    let mut c = redis.conn();
    let t = Instant::now();
    loop {
        let state: Option<String> = redis::cmd("HGET")
            .arg(format!("cycleqd:{name}:config"))
            .arg("state")
            .query(&mut c)
            .unwrap();
        if state.is_some() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the run was not published"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait(child: &mut Child, what: &str, log: &Path) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!(
                "{what} did not end: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn workers_and_a_coordinator_killed_mid_run_give_the_single_process_archives() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = broker_demo(dir.path());
    let single = dir.path().join("single");
    run_with(&cfg, &single, &["--workers", "1"]);

    let redis = Redis::start(None, None);
    let url = redis.url();
    let out = dir.path().join("distributed");
    let logs = dir.path();
    let coord_args = [
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--broker",
        &url,
        "--workers",
        "0",
    ];
    // The coordinator kills itself after applying child 20.
    let mut coord = spawn(
        &coord_args,
        &[("CYCLEQD_SIGNAL_AT", "20:KILL")],
        &redis,
        &logs.join("c1.log"),
    );
    wait_published(&redis, "distributed");
    // Worker A alone takes children 1, 2, … and dies holding child 3.
    let mut a = spawn(
        &["worker", "--broker", &url],
        &[("CYCLEQD_WORKER_KILL_AT", "3")],
        &redis,
        &logs.join("a.log"),
    );
    let s = wait(&mut a, "worker A", &logs.join("a.log"));
    assert_eq!(
        s.signal(),
        Some(libc::SIGKILL),
        "worker A was to die at child 3"
    );
    // Worker B takes child 3 over after the visibility timeout, then everything else.
    let mut b = spawn(
        &["worker", "--broker", &url],
        &[],
        &redis,
        &logs.join("b.log"),
    );
    let s = wait(&mut coord, "the coordinator", &logs.join("c1.log"));
    assert_eq!(
        s.signal(),
        Some(libc::SIGKILL),
        "the coordinator was to die at child 20"
    );
    // The same command on the same folder and broker resumes and finishes.
    let mut coord = spawn(&coord_args, &[], &redis, &logs.join("c2.log"));
    let s = wait(
        &mut coord,
        "the restarted coordinator",
        &logs.join("c2.log"),
    );
    assert!(
        s.success(),
        "{}",
        std::fs::read_to_string(logs.join("c2.log")).unwrap()
    );
    let s = wait(&mut b, "worker B", &logs.join("b.log"));
    assert!(
        s.success(),
        "worker B: {}",
        std::fs::read_to_string(logs.join("b.log")).unwrap()
    );

    assert_same_archives(&single, &out, &["alpha", "beta", "gamma"]);
    let ev = events(&out);
    let mut children: Vec<u64> = ev.iter().map(|e| e["child"].as_u64().unwrap()).collect();
    children.sort();
    assert_eq!(
        children,
        (1..=36).collect::<Vec<_>>(),
        "every child exactly once"
    );
    let raw: Vec<serde_json::Value> = String::from_utf8(read(&out.join("events.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let third = raw.iter().find(|e| e["child"] == 3).unwrap();
    assert_eq!(third["attempts"], 2, "child 3 was taken over once: {third}");
    assert!(third["worker"].as_str().unwrap().ends_with("cpu:0"));
    let c2 = std::fs::read_to_string(logs.join("c2.log")).unwrap();
    assert!(c2.contains("broker:"), "{c2}");
}

#[test]
fn garbage_on_the_streams_is_dead_lettered_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = broker_demo(dir.path());
    let redis = Redis::start(None, None);
    let mut c = redis.conn();
    let run = "garbage";
    type Entry<'a> = (&'a str, Vec<(&'a str, &'a [u8])>);
    let entries: [Entry; 5] = [
        ("children", vec![("hello", b"world")]),
        (
            "children",
            vec![
                ("v", b"1"),
                ("run", b"garbage"),
                ("fp", b"0000000000000000"),
                ("child", b"1"),
                ("attempt", b"1"),
                ("genome", b"abcd"),
                ("sum", b"0"),
            ],
        ),
        ("children", vec![("v", b"99"), ("run", b"garbage")]),
        (
            "results",
            vec![
                ("v", b"1"),
                ("run", b"garbage"),
                ("fp", b"nope"),
                ("child", b"2"),
                ("attempt", b"1"),
                ("worker", b"x"),
                ("seconds", b"1"),
                ("outcome", b"{}"),
            ],
        ),
        ("results", vec![("junk", b"\xff\xfe")]),
    ];
    for (stream, entry) in entries {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(format!("cycleqd:{run}:{stream}")).arg("*");
        for (k, v) in entry {
            cmd.arg(k).arg(v);
        }
        cmd.query::<String>(&mut c).unwrap();
    }
    let out = dir.path().join(run);
    let o = bin()
        .args([
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--broker",
            &redis.url(),
            "--workers",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(events(&out).len(), 36);
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("cycleqd:{run}:dead"))
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    let reasons: Vec<String> = dead
        .ids
        .iter()
        .map(|e| match &e.map["reason"] {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    for want in ["`v` is missing", "fingerprint", "wire version 99"] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no `{want}` in {reasons:?}"
        );
    }
}

#[test]
fn a_worker_with_other_models_refuses_to_take_work() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = broker_demo(dir.path());
    let redis = Redis::start(None, None);
    let url = redis.url();
    let out = dir.path().join("guarded");
    let mut coord = spawn(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--broker",
            &url,
            "--workers",
            "1",
        ],
        &[],
        &redis,
        &dir.path().join("c.log"),
    );
    wait_published(&redis, "guarded");
    // The same demo with other experts, mounted where the coordinator's are.
    let other = dir.path().join("other");
    let o = bin()
        .args([
            "synth",
            "--out",
            other.join("demo").to_str().unwrap(),
            "--seed",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let demo_dir = cfg.parent().unwrap();
    let map = format!("{}={}", demo_dir.display(), other.join("demo").display());
    let o = bin()
        .args([
            "worker",
            "--broker",
            &url,
            "--path-map",
            &map,
            "--factor-cache",
            dir.path().join("wf").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("is not the coordinator's") && e.lines().count() == 1,
        "{e}"
    );
    let s = wait(&mut coord, "the coordinator", &dir.path().join("c.log"));
    assert!(s.success());
}

/// A CA and a server certificate for "localhost", made with openssl.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cycleqd test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn tls_and_a_password_work_and_the_password_is_written_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    certificates(&certs);
    let cfg = broker_demo(dir.path());
    let password = "s3cret-Passw0rd";
    let redis = Redis::start(Some(password), Some(&certs));
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let out = dir.path().join("secure");
    let mut coord = spawn(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--broker",
            &url,
            "--workers",
            "0",
        ],
        &[],
        &redis,
        &dir.path().join("c.log"),
    );
    wait_published(&redis, "secure");
    let mut w = spawn(
        &["worker", "--broker", &url],
        &[],
        &redis,
        &dir.path().join("w.log"),
    );
    let s = wait(&mut coord, "the coordinator", &dir.path().join("c.log"));
    assert!(
        s.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("c.log")).unwrap()
    );
    assert!(wait(&mut w, "the worker", &dir.path().join("w.log")).success());
    let c_log = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
    assert!(c_log.contains("rediss://:***@localhost"), "{c_log}");
    // Nowhere on disk: logs, events, summary, config, checkpoint.
    for f in ["c.log", "w.log"] {
        assert!(
            !std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .contains(password),
            "{f}"
        );
    }
    for f in [
        "events.jsonl",
        "summary.json",
        "config.toml",
        "checkpoint.safetensors",
    ] {
        let bytes = read(&out.join(f));
        assert!(
            !String::from_utf8_lossy(&bytes).contains(password),
            "{f} holds the password"
        );
    }
    // A wrong password is one clear line that does not echo it.
    let bad = url.replace(password, "wrong-one");
    let mut cmd = bin();
    cmd.args(["worker", "--broker", &bad]);
    redis.env(&mut cmd);
    let o = cmd.output().unwrap();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(!e.contains("wrong-one") && e.contains("***"), "{e}");
}
