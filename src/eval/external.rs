//! External evaluators: a user command (an argument list, never a shell) run on an exported
//! checkpoint of the child, for benchmarks the engine cannot run itself (agent tasks in
//! sandboxes). `{model}` and `{task}` in the arguments are replaced by the checkpoint directory
//! and the task's name; without `{model}` the directory is appended as the last argument. The
//! command must exit 0 and print `{"score": x}` (x finite) as its last non-empty stdout line.
//! Anything else — a crash, a timeout (the process is killed), garbage — is an
//! [`ExternalFailure`] with the reason, so the caller can mark the child failed and go on.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How an external evaluation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalFailure(pub String);

impl std::fmt::Display for ExternalFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug)]
pub struct ExternalEvaluator {
    pub command: Vec<String>,
    pub timeout: Duration,
    /// The working directory it runs in (its relative paths resolve from there); `None`: the
    /// engine's.
    pub dir: Option<std::path::PathBuf>,
    /// The model is served to the command (`{base_url}`, `{model_name}`) instead of exported
    /// (`{model}`).
    pub serve: bool,
}

/// Where an evaluator finds the model.
#[derive(Clone, Copy, Debug)]
pub enum ModelAt<'a> {
    /// An exported checkpoint directory (`{model}`).
    Dir(&'a Path),
    /// An OpenAI-compatible endpoint (`{base_url}`, `{model_name}`).
    Served {
        base_url: &'a str,
        model_name: &'a str,
    },
}

impl ExternalEvaluator {
    /// The argument list for one evaluation of an exported model.
    pub fn arguments(&self, model_dir: &Path, task: &str) -> Vec<String> {
        self.arguments_for(ModelAt::Dir(model_dir), task)
    }

    /// The argument list for one evaluation: `{task}` replaced, and `{model}` (appended when
    /// the command does not name it) or `{base_url}` and `{model_name}`.
    pub fn arguments_for(&self, at: ModelAt, task: &str) -> Vec<String> {
        match at {
            ModelAt::Dir(model_dir) => {
                let dir = model_dir.display().to_string();
                let mut args: Vec<String> = self
                    .command
                    .iter()
                    .map(|a| a.replace("{model}", &dir).replace("{task}", task))
                    .collect();
                if !self.command.iter().any(|a| a.contains("{model}")) {
                    args.push(dir);
                }
                args
            }
            ModelAt::Served {
                base_url,
                model_name,
            } => self
                .command
                .iter()
                .map(|a| {
                    a.replace("{base_url}", base_url)
                        .replace("{model_name}", model_name)
                        .replace("{task}", task)
                })
                .collect(),
        }
    }

    /// Runs the command on `model_dir` and returns its score.
    pub fn score(&self, model_dir: &Path, task: &str) -> Result<f64, ExternalFailure> {
        self.score_at(ModelAt::Dir(model_dir), task)
    }

    /// Runs the command on the model where it is and returns its score.
    pub fn score_at(&self, at: ModelAt, task: &str) -> Result<f64, ExternalFailure> {
        let args = self.arguments_for(at, task);
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| ExternalFailure("the evaluator command is empty".into()))?;
        // A relative program path (`./eval.sh`, `scripts/eval.py`) is the working
        // directory's, like every other relative path of the command.
        let program = match &self.dir {
            Some(d) if program.contains('/') && Path::new(program).is_relative() => {
                d.join(program).display().to_string()
            }
            _ => program.clone(),
        };
        let program = &program;
        let mut cmd = Command::new(program);
        if let Some(d) = &self.dir {
            cmd.current_dir(d);
        }
        // Its own process group, so a timeout kills what it started too (a shell's children
        // would otherwise hold the pipes open).
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A script written just before (by a setup step, or a test) can still be open for
        // writing in a process another thread is forking, and exec then fails with ETXTBSY
        // until that child execs: a short wait, not a failed evaluation.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => {
                    break r
                        .map_err(|e| ExternalFailure(format!("cannot start `{program}`: {e}")))?
                }
            }
        };
        // Drain both pipes on threads so a chatty evaluator cannot block on a full pipe. The
        // output is complete only when every process holding the pipes let go: that wait is
        // inside the timeout too.
        let drain = |mut r: Box<dyn Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                let _ = tx.send(String::from_utf8_lossy(&s).into_owned());
            });
            rx
        };
        let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
        let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
        let start = Instant::now();
        let timed_out = |what: &str| {
            ExternalFailure(format!(
                "`{program}` timed out after {:.1} s{what} and was killed",
                self.timeout.as_secs_f64()
            ))
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() >= self.timeout => {
                    kill_group(&mut child);
                    let _ = child.wait();
                    return Err(timed_out(""));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(ExternalFailure(format!("waiting for `{program}`: {e}"))),
            }
        };
        let read = |rx: &std::sync::mpsc::Receiver<String>| {
            rx.recv_timeout(self.timeout.saturating_sub(start.elapsed()))
                .ok()
        };
        let (stdout, stderr) = (read(&out), read(&err));
        // Whatever it started is done with: nothing of an evaluation outlives it.
        kill_group(&mut child);
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            return Err(timed_out(" (a process it started kept its output open)"));
        };
        if !status.success() {
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
            return Err(ExternalFailure(format!(
                "`{program}` failed ({status}){}",
                last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            )));
        }
        parse_score(&stdout).map_err(|m| ExternalFailure(format!("`{program}`: {m}")))
    }
}

fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a negative pid signals the process group the child leads (it was
    // spawned with process_group(0)); no memory is shared.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    let _ = child.kill();
}

/// The score in the last non-empty line of an evaluator's stdout.
pub fn parse_score(stdout: &str) -> Result<f64, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("printed nothing (expected {\"score\": x})")?;
    let short: String = line.chars().take(80).collect();
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| format!("last line is not JSON: `{short}`"))?;
    let x = v
        .get("score")
        .and_then(|s| s.as_f64())
        .ok_or_else(|| format!("last line has no numeric `score`: `{short}`"))?;
    if !x.is_finite() {
        return Err(format!("score is not finite: {x}"));
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_ms: u64) -> ExternalEvaluator {
        ExternalEvaluator {
            command: vec!["sh".into(), "-c".into(), script.into(), "eval".into()],
            timeout: Duration::from_millis(timeout_ms),
            dir: None,
            serve: false,
        }
    }

    #[test]
    fn substitutes_or_appends_the_model_dir() {
        let e = ExternalEvaluator {
            command: vec!["ev".into(), "--model={model}".into(), "{task}".into()],
            timeout: Duration::from_secs(1),
            dir: None,
            serve: false,
        };
        assert_eq!(
            e.arguments(Path::new("/m"), "code"),
            ["ev", "--model=/m", "code"]
        );
        let e = ExternalEvaluator {
            command: vec!["ev".into()],
            timeout: Duration::from_secs(1),
            dir: None,
            serve: false,
        };
        assert_eq!(e.arguments(Path::new("/m"), "code"), ["ev", "/m"]);
    }

    #[test]
    fn runs_in_its_directory_so_relative_paths_are_the_configs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        std::fs::write(dir.path().join("scripts/ev.sh"), "cat data.txt\n").unwrap();
        std::fs::write(dir.path().join("data.txt"), "{\"score\": 0.75}\n").unwrap();
        let e = ExternalEvaluator {
            command: vec!["sh".into(), "scripts/ev.sh".into()],
            timeout: Duration::from_secs(5),
            dir: Some(dir.path().to_path_buf()),
            serve: false,
        };
        assert_eq!(e.score(Path::new("/m"), "t"), Ok(0.75));
        // The program itself given relative to the directory.
        std::fs::write(
            dir.path().join("scripts/ev.sh"),
            "#!/bin/sh\ncat data.txt\n",
        )
        .unwrap();
        let mut perm = std::fs::metadata(dir.path().join("scripts/ev.sh"))
            .unwrap()
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(dir.path().join("scripts/ev.sh"), perm).unwrap();
        let direct = ExternalEvaluator {
            command: vec!["scripts/ev.sh".into()],
            ..e
        };
        assert_eq!(direct.score(Path::new("/m"), "t"), Ok(0.75));
    }

    #[test]
    fn reads_the_score_and_reports_every_failure() {
        let dir = Path::new("/tmp");
        let ok = sh("echo progress; echo '{\"score\": 0.25}'", 5000);
        assert_eq!(ok.score(dir, "t"), Ok(0.25));
        // The model dir is the script's $1 (appended).
        let echo_dir = sh("echo \"{\\\"score\\\": ${#1}}\"", 5000);
        assert_eq!(echo_dir.score(dir, "t"), Ok(4.0));
        for (script, timeout, want) in [
            ("echo boom >&2; exit 3", 5000, "boom"),
            ("echo not json", 5000, "not JSON"),
            ("echo '{\"score\": \"high\"}'", 5000, "no numeric"),
            ("true", 5000, "printed nothing"),
            ("sleep 5", 200, "timed out"),
            // Exits at once, but a process it started holds the pipe past the timeout.
            (
                "(sleep 5) & echo '{\"score\": 1}'",
                300,
                "kept its output open",
            ),
        ] {
            let e = sh(script, timeout).score(dir, "t").unwrap_err();
            assert!(e.0.contains(want), "{script}: {e}");
        }
        let missing = ExternalEvaluator {
            command: vec!["/nonexistent/evaluator".into()],
            timeout: Duration::from_secs(1),
            dir: None,
            serve: false,
        };
        assert!(missing
            .score(dir, "t")
            .unwrap_err()
            .0
            .contains("cannot start"));
    }
}
