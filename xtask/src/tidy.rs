//! Source checks (`cargo xtask tidy`, part of `cargo xtask ci`, and tests of this
//! crate): rules that are cheaper to enforce than to review. Each failure names the
//! file, the line and what to do. The rules: every source file opens with `//!`; no
//! wall-clock reads on the session path; no `unwrap`/`expect` outside tests without a
//! comment saying why it cannot fail.

use std::path::{Path, PathBuf};

/// The crates, and the session driver's files, that never read the wall clock: time is
/// passed in, or comes from tokio's clock (which paused-time tests drive).
const NO_WALL_CLOCK: &[&str] = &[
    "tunnel-proto/src",
    "tunnel-reconnect/src",
    "tunnel-router/src/delivery.rs",
    "tunnel-router/src/registry.rs",
    "tunnel-router/src/connection_loop.rs",
    "tunnel-router/src/agent/driver.rs",
];

/// Runs every check over the workspace at `root`.
pub(crate) fn check(root: &Path) -> Result<(), String> {
    let files = rust_files(root);
    let mut problems = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let shown = file.strip_prefix(root).unwrap_or(file);
        problems.extend(module_doc(shown, &text));
        let test_file = shown.file_name().is_some_and(|n| n == "tests.rs")
            || shown.components().any(|c| c.as_os_str() == "tests");
        if !test_file && NO_WALL_CLOCK.iter().any(|prefix| shown.starts_with(prefix)) {
            problems.extend(wall_clock(shown, &text));
        }
        let example = shown.components().any(|c| {
            let c = c.as_os_str();
            c == "examples" || c == "benches"
        });
        if !test_file && !example {
            problems.extend(unexplained_unwraps(shown, &text));
        }
    }
    if problems.is_empty() {
        eprintln!("<== ok: {} source files pass the tidy checks", files.len());
        Ok(())
    } else {
        Err(format!("tidy:\n{}", problems.join("\n")))
    }
}

/// Every source file opens with a `//!` line saying what it holds.
fn module_doc(file: &Path, text: &str) -> Option<String> {
    (!text.starts_with("//!")).then(|| {
        format!(
            "{}:1: open the file with a `//!` line saying what it holds",
            file.display()
        )
    })
}

/// No `std::time::Instant::now` or `SystemTime::now` outside tests (and no bare
/// `Instant::now` where the file's `Instant` is std's).
fn wall_clock(file: &Path, text: &str) -> Vec<String> {
    let std_instant = text.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("use std::time::") && l.contains("Instant")
    });
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break; // tests live at the end of a file
        }
        if code.starts_with("//") {
            continue;
        }
        let read = code.contains("std::time::Instant::now")
            || code.contains("SystemTime::now")
            || (std_instant && code.contains("Instant::now("));
        if read {
            found.push(format!(
                "{}:{}: a wall-clock read on the session path: take `now` as an argument, or use tokio::time::Instant",
                file.display(),
                n + 1
            ));
        }
    }
    found
}

/// How many lines above an `unwrap`/`expect` its explaining comment may sit (a
/// statement split over a few lines).
const EXPLAINED_WITHIN: usize = 3;

/// No `.unwrap()` or `.expect(..)` outside tests without a `//` comment (on its line or
/// just above it) saying why it cannot fail. Clippy's `unwrap_used` already refuses
/// `unwrap`; this also covers `expect` and says what to do.
fn unexplained_unwraps(file: &Path, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break; // tests live at the end of a file
        }
        if code.starts_with("//") {
            continue;
        }
        let code = without_strings(code);
        let Some(at) = code.find(".unwrap()").or_else(|| code.find(".expect(")) else {
            continue;
        };
        let same_line = code[at..].contains("//");
        let above = lines[n.saturating_sub(EXPLAINED_WITHIN)..n]
            .iter()
            .any(|l| {
                let l = l.trim_start();
                l.starts_with("//") && !l.starts_with("///") && !l.starts_with("//!")
            });
        if !(same_line || above) {
            found.push(format!(
                "{}:{}: `unwrap`/`expect` outside tests: return the error, or say in a `//` comment why it cannot fail",
                file.display(),
                n + 1
            ));
        }
    }
    found
}

/// `code` with the contents of its string literals blanked out (escapes honoured;
/// enough for one line of ordinary Rust).
fn without_strings(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in code.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => {
                in_string = false;
                out.push(c);
            }
            (true, false, _) => {}
            (false, _, '"') => {
                in_string = true;
                out.push(c);
            }
            (false, _, _) => out.push(c),
        }
    }
    out
}

/// The workspace's Rust sources: every crate's `src`, `tests`, `benches` and
/// `examples`, not `target` or the fuzz workspace. Test files (`tests.rs`, anything
/// under `tests/`) are held to the module-doc rule only.
fn rust_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !(name.starts_with('.') || name == "target" || name == "fuzz") {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_passes_the_tidy_checks() {
        let root = crate::project_root();
        if let Err(problems) = check(&root) {
            panic!("{problems}");
        }
    }

    #[test]
    fn a_file_without_a_module_doc_is_named() {
        let problem = module_doc(Path::new("a/b.rs"), "use std::fmt;\n").expect("found");
        assert!(problem.starts_with("a/b.rs:1: "), "{problem}");
        assert!(module_doc(Path::new("a/b.rs"), "//! B.\n").is_none());
    }

    #[test]
    fn unwraps_and_expects_need_a_comment_outside_tests() {
        let text = "//! X.\nfn a() { x.unwrap(); }\nfn b() {\n    // Checked above: never empty.\n    v.first().expect(\"one\");\n}\nfn c() { y.expect(\"z\"); // the map holds every key\n}\n/// doc: z.unwrap()\nfn d() { w.unwrap_or(1); r.expect_reply(); }\n#[cfg(test)]\nmod tests { fn e() { q.unwrap(); } }\n";
        let found = unexplained_unwraps(Path::new("p.rs"), text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("p.rs:2: "), "{found:?}");
        let quoted = "//! X.\nfn f() { s.find(\".unwrap()\"); }\n";
        assert!(unexplained_unwraps(Path::new("p.rs"), quoted).is_empty());
    }

    #[test]
    fn wall_clock_reads_are_found_outside_tests_and_comments() {
        let text = "//! X.\nuse std::time::{Duration, Instant};\nfn a() { let t = Instant::now(); }\n/// Instant::now() in a doc\nfn b() { SystemTime::now(); }\n#[cfg(test)]\nmod tests { fn c() { std::time::Instant::now(); } }\n";
        let found = wall_clock(Path::new("p.rs"), text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("p.rs:3: "), "{found:?}");
        assert!(found[1].starts_with("p.rs:5: "), "{found:?}");
        // tokio's Instant is the session path's clock.
        let tokio = "//! X.\nuse tokio::time::Instant;\nfn a() { Instant::now(); }\n";
        assert!(wall_clock(Path::new("p.rs"), tokio).is_empty());
    }
}
