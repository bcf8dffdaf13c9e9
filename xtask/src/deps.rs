//! The dependency rules of ARCHITECTURE.md, checked against `cargo metadata`.
//!
//! ARCHITECTURE.md lists the workspace crates bottom-up in a fenced block tagged
//! `layers`. A crate may depend (normally or for builds) only on crates listed before
//! it; dev-dependencies may reach anything below `tunnel-tests`. `tunnel-proto` must
//! not pull in any IO crate, directly or through another dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Crates that do IO or run async runtimes; none may appear under `tunnel-proto`.
const IO_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "tungstenite",
    "tokio-tungstenite",
    "tower",
    "tower-service",
    "tower-layer",
    "hyper",
    "socket2",
    "async-std",
    "smol",
    "async-io",
    "futures-io",
    "rustls",
    "reqwest",
    "axum",
];

/// The crate that must stay free of IO.
const NO_IO_CRATE: &str = "tunnel-proto";

pub(crate) fn check(root: &Path) -> Result<(), String> {
    eprintln!("\n==> dependency rules (ARCHITECTURE.md layers, cargo metadata)");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .map_err(|e| format!("cannot read ARCHITECTURE.md: {e}"))?;
    let layers = parse_layers(&doc)?;
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--all-features"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cannot parse cargo metadata: {e}"))?;
    let graph = Graph::from_metadata(&metadata)?;
    let violations = violations(&layers, &graph);
    if violations.is_empty() {
        eprintln!("<== ok: {} crates follow the layering", layers.len());
        Ok(())
    } else {
        for v in &violations {
            eprintln!("  - {v}");
        }
        Err(format!("{} dependency rule(s) broken", violations.len()))
    }
}

/// The crate names of the ```layers block, bottom-up.
fn parse_layers(doc: &str) -> Result<Vec<String>, String> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != "```layers");
    if lines.next().is_none() {
        return Err("ARCHITECTURE.md has no ```layers block".into());
    }
    let layers: Vec<String> = lines
        .take_while(|l| l.trim() != "```")
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if layers.is_empty() {
        return Err("the ```layers block in ARCHITECTURE.md is empty".into());
    }
    Ok(layers)
}

/// Which dependency kinds an edge carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Kinds {
    normal: bool,
    dev: bool,
}

/// The package graph: package name to its dependencies' names and kinds.
#[derive(Debug, Default)]
struct Graph {
    deps: BTreeMap<String, BTreeMap<String, Kinds>>,
    workspace: BTreeSet<String>,
}

impl Graph {
    fn from_metadata(meta: &Value) -> Result<Graph, String> {
        let bad = || "unexpected cargo metadata shape".to_string();
        let packages = meta["packages"].as_array().ok_or_else(bad)?;
        let name_of: BTreeMap<&str, &str> = packages
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
            .collect();
        let mut graph = Graph::default();
        for id in meta["workspace_members"].as_array().ok_or_else(bad)? {
            let id = id.as_str().ok_or_else(bad)?;
            graph
                .workspace
                .insert(name_of.get(id).ok_or_else(bad)?.to_string());
        }
        for node in meta["resolve"]["nodes"].as_array().ok_or_else(bad)? {
            let name = name_of
                .get(node["id"].as_str().ok_or_else(bad)?)
                .ok_or_else(bad)?;
            let entry = graph.deps.entry(name.to_string()).or_default();
            for dep in node["deps"].as_array().ok_or_else(bad)? {
                let dep_name = name_of
                    .get(dep["pkg"].as_str().ok_or_else(bad)?)
                    .ok_or_else(bad)?;
                let kinds = entry.entry(dep_name.to_string()).or_default();
                for k in dep["dep_kinds"].as_array().ok_or_else(bad)? {
                    match k["kind"].as_str() {
                        Some("dev") => kinds.dev = true,
                        _ => kinds.normal = true,
                    }
                }
            }
        }
        Ok(graph)
    }

    /// Every package reachable from `root` through normal and build dependencies.
    fn normal_closure(&self, root: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(name) = stack.pop() {
            for (dep, kinds) in self.deps.get(&name).into_iter().flatten() {
                if kinds.normal && seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }
}

fn violations(layers: &[String], graph: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    let rank = |name: &str| layers.iter().position(|l| l == name);
    for member in &graph.workspace {
        if member == "xtask" {
            continue;
        }
        let Some(my_rank) = rank(member) else {
            out.push(format!(
                "{member} is a workspace member but not in the ARCHITECTURE.md layers"
            ));
            continue;
        };
        for (dep, kinds) in graph.deps.get(member).into_iter().flatten() {
            if !graph.workspace.contains(dep) {
                continue;
            }
            let Some(dep_rank) = rank(dep) else {
                out.push(format!(
                    "{member} depends on {dep}, which is not in the layers"
                ));
                continue;
            };
            if kinds.normal && dep_rank >= my_rank {
                out.push(format!(
                    "{member} depends on {dep}, which is not below it in the layering"
                ));
            }
            if kinds.dev && !kinds.normal && dep_rank > my_rank {
                out.push(format!(
                    "{member} has a dev-dependency on {dep}, which is above it in the layering"
                ));
            }
        }
    }
    for name in graph.normal_closure(NO_IO_CRATE) {
        if IO_CRATES.contains(&name.as_str()) {
            out.push(format!("{NO_IO_CRATE} must not depend on IO crate {name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# Architecture\n\n```layers\ntunnel-proto  # bottom\ntunnel-transport\n\ntunnel-cli\n```\n";

    fn graph(edges: &[(&str, &str, Kinds)]) -> Graph {
        let mut g = Graph::default();
        for name in ["tunnel-proto", "tunnel-transport", "tunnel-cli"] {
            g.workspace.insert(name.into());
        }
        for (from, to, kinds) in edges {
            g.deps
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string(), *kinds);
        }
        g
    }

    const NORMAL: Kinds = Kinds {
        normal: true,
        dev: false,
    };
    const DEV: Kinds = Kinds {
        normal: false,
        dev: true,
    };

    #[test]
    fn layers_are_parsed_bottom_up_without_comments() {
        assert_eq!(
            parse_layers(DOC).expect("layers"),
            vec!["tunnel-proto", "tunnel-transport", "tunnel-cli"]
        );
        assert!(parse_layers("no block here").is_err());
    }

    #[test]
    fn downward_dependencies_are_allowed() {
        let layers = parse_layers(DOC).expect("layers");
        let g = graph(&[
            ("tunnel-cli", "tunnel-transport", NORMAL),
            ("tunnel-transport", "tunnel-proto", NORMAL),
            ("tunnel-proto", "serde", NORMAL),
        ]);
        assert_eq!(violations(&layers, &g), Vec::<String>::new());
    }

    #[test]
    fn upward_and_sideways_dependencies_are_violations() {
        let layers = parse_layers(DOC).expect("layers");
        let g = graph(&[
            ("tunnel-proto", "tunnel-transport", NORMAL),
            ("tunnel-transport", "tunnel-cli", DEV),
        ]);
        let v = violations(&layers, &g);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].contains("tunnel-proto depends on tunnel-transport"),
            "{v:?}"
        );
        assert!(v[1].contains("dev-dependency"), "{v:?}");
    }

    #[test]
    fn io_crates_under_proto_are_violations_even_indirectly() {
        let layers = parse_layers(DOC).expect("layers");
        let g = graph(&[
            ("tunnel-proto", "some-helper", NORMAL),
            ("some-helper", "tokio", NORMAL),
            ("tunnel-proto", "criterion", DEV),
            ("criterion", "tower", NORMAL),
        ]);
        let v = violations(&layers, &g);
        assert_eq!(v, vec!["tunnel-proto must not depend on IO crate tokio"]);
    }

    #[test]
    fn members_missing_from_the_layers_are_reported() {
        let layers = vec!["tunnel-proto".to_string()];
        let v = violations(&layers, &graph(&[]));
        assert_eq!(v.len(), 2, "{v:?}");
    }
}
