//! Programs from completions, as code benchmarks score them: the program is the first fenced
//! code block of the completion (```` ```python … ``` ````), else the whole completion; when
//! the example names an `entry_point` that the program does not define but the prompt does
//! (HumanEval's style: the completion continues a signature), the prompt is put before it. The
//! file run is `setup`, the program, then the tests, one after the other; it passes when the
//! interpreter exits with status 0. pass@k over `n` samples with `c` passing is the unbiased
//! estimator `1 − C(n−c, k) / C(n, k)` (Chen et al., 2021).

use super::sandbox::Sandbox;
use super::task::CodeTests;
use crate::error::{Error, Result};

/// The program a completion holds.
pub fn extract(completion: &str) -> &str {
    let Some(open) = completion.find("```") else {
        return completion;
    };
    // Skip the fence's info string (```python) to the end of its line.
    let after = &completion[open + 3..];
    let body_start = match after.find('\n') {
        Some(nl) => nl + 1,
        None => return completion,
    };
    let body = &after[body_start..];
    match body.find("```") {
        Some(close) => &body[..close],
        // An unclosed block (the generation was cut): everything after the fence.
        None => body,
    }
}

/// The file run for one completion: setup, program and tests.
pub fn assemble(prompt: Option<&str>, completion: &str, t: &CodeTests) -> String {
    let mut program = extract(completion).to_string();
    if let (Some(entry), Some(prompt)) = (&t.entry_point, prompt) {
        let def = format!("def {entry}(");
        if !program.contains(&def) && prompt.contains(&def) {
            program = format!("{prompt}{program}");
        }
    }
    let mut file = String::new();
    if let Some(setup) = &t.setup {
        file.push_str(setup);
        file.push_str("\n\n");
    }
    file.push_str(&program);
    file.push_str("\n\n");
    for test in &t.tests {
        file.push_str(test);
        file.push('\n');
    }
    file
}

/// pass@k of `n` samples of which `c` passed.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(k >= 1 && k <= n && c <= n, "pass@{k} of {c}/{n}");
    if n - c < k {
        return 1.0;
    }
    if k == 1 {
        // The fraction itself, exactly (the product form rounds 3/10 to 0.30000000000000004).
        return c as f64 / n as f64;
    }
    // 1 − Π_{i = n−c+1}^{n} (1 − k / i): the ratio of binomials without overflow.
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// Checks that every snippet compiles as Python (`compile(…, 'exec')` in the sandbox, nothing
/// run); returns the index and error of the first that does not.
pub fn first_syntax_error(
    sandbox: &Sandbox,
    snippets: &[String],
) -> Result<Option<(usize, String)>> {
    if snippets.is_empty() {
        return Ok(None);
    }
    // The snippets as JSON, inside a JSON string literal (which Python reads as a string
    // literal too: serde_json writes only escapes Python shares).
    let data = serde_json::to_string(&serde_json::to_string(snippets).expect("strings serialise"))
        .expect("a string serialises");
    let checker = format!(
        "import json\n\
         snippets = json.loads({data})\n\
         for i, s in enumerate(snippets):\n\
         \x20   try:\n\
         \x20       compile(s, '<test>', 'exec')\n\
         \x20   except SyntaxError as e:\n\
         \x20       print(json.dumps([i, f'{{e.msg}} (line {{e.lineno}})']))\n\
         \x20       break\n"
    );
    let e = sandbox.run_python(&checker)?;
    if !e.passed() {
        return Err(Error::invalid(format!(
            "checking the tests' syntax with {} failed: {}",
            sandbox.interpreter().display(),
            e.reason()
        )));
    }
    let out = e.stdout.trim();
    if out.is_empty() {
        return Ok(None);
    }
    let (i, msg): (usize, String) = serde_json::from_str(out)
        .map_err(|err| Error::invalid(format!("the syntax check printed `{out}`: {err}")))?;
    Ok(Some((i, msg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_fenced_block_or_the_whole_completion() {
        assert_eq!(
            extract("Sure:\n```python\ndef f():\n    return 1\n```\nDone. ```x```"),
            "def f():\n    return 1\n"
        );
        assert_eq!(extract("```\nx = 1\n```"), "x = 1\n");
        assert_eq!(extract("def f(): return 2"), "def f(): return 2");
        assert_eq!(extract("```python\ndef f(): return 3"), "def f(): return 3");
    }

    #[test]
    fn a_continuation_gets_its_prompt() {
        let t = CodeTests {
            tests: vec!["assert add(1, 2) == 3".into()],
            setup: Some("import math".into()),
            entry_point: Some("add".into()),
        };
        let prompt = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n";
        let file = assemble(Some(prompt), "    return a + b\n", &t);
        assert_eq!(file, "import math\n\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b\n\n\nassert add(1, 2) == 3\n");
        // A completion with its own definition is used as it is.
        let own = assemble(
            Some(prompt),
            "```python\ndef add(a, b):\n    return b + a\n```",
            &t,
        );
        assert!(
            own.starts_with("import math\n\ndef add(a, b):\n    return b + a\n"),
            "{own}"
        );
    }

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        // Against the binomial form computed directly.
        fn binom(n: u64, k: u64) -> f64 {
            (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product()
        }
        for (n, c, k) in [
            (10, 3, 1),
            (10, 3, 5),
            (20, 0, 5),
            (5, 5, 5),
            (7, 2, 6),
            (1, 1, 1),
            (1, 0, 1),
        ] {
            let want = if n - c < k {
                1.0
            } else {
                1.0 - binom((n - c) as u64, k as u64) / binom(n as u64, k as u64)
            };
            assert!((pass_at_k(n, c, k) - want).abs() < 1e-12, "{n} {c} {k}");
        }
        assert_eq!(pass_at_k(10, 3, 1), 0.3);
    }
}
