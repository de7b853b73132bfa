//! The README's configuration table and the binary agree, read as a user
//! would read them: every flag `runcast up --help` and `runcast gateway
//! --help` list is in the table with its environment variable, and its
//! default there is the one the binary uses. (An outside reader found
//! `--publish-rate-per-key` missing and the gateway's `--listen` default
//! wrong.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// A flag as `--help` shows it: name, env var, default.
#[derive(Debug)]
struct Flag {
    name: String,
    env: Option<String>,
    default: Option<String>,
}

fn help(role: &str) -> Vec<Flag> {
    let out = Command::new(BIN)
        .args([role, "--help"])
        .output()
        .expect("runcast runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags: Vec<Flag> = Vec::new();
    let mut block = String::new();
    let flush = |block: &mut String, flags: &mut Vec<Flag>| {
        if let Some(name) = block
            .split_whitespace()
            .find(|w| w.starts_with("--"))
            .map(|w| w.trim_end_matches(',').to_owned())
        {
            let field = |key: &str| {
                block.find(key).map(|i| {
                    let rest = &block[i + key.len()..];
                    rest[..rest.find(']').unwrap_or(rest.len())].to_owned()
                })
            };
            flags.push(Flag {
                name,
                env: field("[env: ").map(|e| e.trim_end_matches('=').to_owned()),
                default: field("[default: "),
            });
        }
        block.clear();
    };
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('-') && line.starts_with("  ") && !line.starts_with("          ") {
            flush(&mut block, &mut flags);
        }
        block.push_str(t);
        block.push(' ');
    }
    flush(&mut block, &mut flags);
    flags.retain(|f| f.name != "--help" && f.name != "--version");
    assert!(
        flags.len() > 20,
        "parsed {} flags from {role} --help",
        flags.len()
    );
    flags
}

/// The table's rows: (flag cell, env cell, default cell).
fn table() -> Vec<(String, String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let start = readme
        .find("| flag | env | default | meaning |")
        .expect("the configuration table");
    readme[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (
                cells[0].to_owned(),
                cells[1].to_owned(),
                cells[2].to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_flag_of_up_and_gateway_is_in_the_readme_with_its_env_and_default() {
    let rows = table();
    let mut problems = Vec::new();
    for role in ["up", "gateway"] {
        for f in help(role) {
            let Some((_, env, default)) = rows
                .iter()
                .find(|(flags, _, _)| flags.contains(&format!("`{}`", f.name)))
            else {
                problems.push(format!("{role}: {} is not in the README table", f.name));
                continue;
            };
            if let Some(e) = &f.env
                && !env.contains(&format!("`{e}`"))
            {
                problems.push(format!("{role}: {} has env {e}, README says {env}", f.name));
            }
            if let Some(d) = &f.default
                && !default.contains(d.as_str())
            {
                problems.push(format!(
                    "{role}: {} defaults to {d}, README says {default}",
                    f.name
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "README vs --help:\n{}",
        problems.join("\n")
    );
}
