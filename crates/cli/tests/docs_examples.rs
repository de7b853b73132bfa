//! The documented commands and snippets, run as written, so the docs cannot
//! drift from the binary again. (An outside reader followed the token example
//! in docs/security.md and got a 401: it set a `kid` no flag could match.)
//!
//! A fenced block runs when the line before it is an HTML comment:
//!
//! - `<!-- test: server -->`: a shell block whose last line starts a
//!   `runcast` server; the lines before it run in the test's shell first
//!   (exports), the server runs in the background on a free address
//!   (`RUNCAST_LISTEN`), and the blocks after it in the same file talk to it;
//! - `<!-- test -->`: a `sh` or `python` block run against the latest server
//!   of its file, or a fresh `runcast up` when its file started none.
//!
//! In every block `localhost:8080` and `127.0.0.1:8080` mean the server,
//! `cargo run --release -p runcast-cli --` means the `runcast` binary, and
//! `$SECRET` is a fresh 32-byte secret. A comment line `# {...}` after a
//! command is output the command must print, and every token the block
//! prints (a bare JWT, or a page link with `#token=`) must be accepted by the
//! server.

use std::{path::PathBuf, process::Command, time::Duration};

use runcast_test_support::nats::free_addr;

const BIN: &str = env!("CARGO_BIN_EXE_runcast");

/// Markers of blocks that other suites run: `js-client` by
/// clients/js/test/docs.test.js, `python-client` by clients/python's tests.
const CLIENT_MARKERS: &[&str] = &["js-client", "python-client"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    marker: String,
    lang: String,
    body: String,
}

/// Every marked block of the README and docs/, in file order.
fn blocks() -> Vec<Block> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("doc");
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let marker = lines[i]
                .trim()
                .strip_prefix("<!-- test")
                .and_then(|m| m.strip_suffix("-->"));
            if let Some(marker) = marker
                && let Some(lang) = lines.get(i + 1).and_then(|l| l.strip_prefix("```"))
            {
                let end = (i + 2..lines.len())
                    .find(|&j| lines[j].starts_with("```"))
                    .unwrap_or_else(|| panic!("{}:{}: unclosed block", path.display(), i + 2));
                let marker = marker.trim().trim_start_matches(':').trim();
                // The client libraries' snippets run in their own test
                // suites, with the package installed (clients/*/check.sh).
                if CLIENT_MARKERS.contains(&marker) {
                    i = end + 1;
                    continue;
                }
                out.push(Block {
                    file: path.file_name().unwrap().to_string_lossy().into_owned(),
                    line: i + 2,
                    marker: marker.to_owned(),
                    lang: lang.trim().to_owned(),
                    body: lines[i + 2..end].join("\n"),
                });
                i = end;
            }
            i += 1;
        }
    }
    out
}

/// What a block means here: the server address for `localhost:8080`, the
/// binary for `cargo run`.
fn adapt(body: &str, addr: &str) -> String {
    body.replace("cargo run --release -p runcast-cli --", "runcast")
        .replace("localhost:8080", addr)
        .replace("127.0.0.1:8080", addr)
}

/// A shell script for a block: python blocks run through a heredoc.
fn script_of(b: &Block, addr: &str) -> String {
    let body = adapt(&b.body, addr);
    match b.lang.as_str() {
        "sh" | "bash" => body,
        "python" => format!("python3 - <<'RUNCAST_DOC_EOF'\n{body}\nRUNCAST_DOC_EOF\n"),
        other => panic!("{}:{}: cannot run a {other:?} block", b.file, b.line),
    }
}

/// Runs one server block and the client blocks that follow it as one shell
/// session, then checks what they printed.
async fn run_session(server: Option<&Block>, clients: &[&Block]) {
    let addr = free_addr();
    let a = addr.to_string();
    let secret = format!("{:064x}", u128::from(std::process::id()) << 64 | 0x5eed);
    let mut script = String::from("set -euo pipefail\n");
    match server {
        Some(s) => {
            let body = adapt(&s.body, &a);
            let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
            let (last, before) = lines.split_last().expect("a server block has a command");
            assert!(
                last.trim_start().starts_with("runcast "),
                "{}:{}: a server block ends with a runcast command",
                s.file,
                s.line
            );
            script += &before.join("\n");
            script += &format!("\n{last} >/dev/null 2>&1 &\n");
        }
        None => script += "runcast up --log warn >/dev/null 2>&1 &\n",
    }
    // The server dies with the script, whatever ends it.
    script +=
        "server=$!\nprinted=$(mktemp)\ntrap 'kill $server 2>/dev/null; rm -f \"$printed\"' EXIT\n";
    script += &format!(
        "for i in $(seq 100); do curl -fsS http://{a}/healthz >/dev/null 2>&1 && break; sleep 0.1; done\n"
    );
    for c in clients {
        script += &format!("echo '=== {}:{}'\n", c.file, c.line);
        script += &format!("{{\n{}\n}} | tee -a \"$printed\"\n", script_of(c, &a));
    }
    // Every token the blocks printed, asked of the server they talk to (on
    // lines of their own: the last output may lack a newline).
    script += "echo\n";
    script += &format!(
        "for t in $(grep -oE 'eyJ[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]+' \"$printed\" || true); do\n\
         echo \"token-status $(curl -s -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $t\" http://{a}/v1/runs)\"\n\
         done\n"
    );
    let bin_dir = PathBuf::from(BIN).parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let where_ = server.map_or("default runcast up".to_owned(), |s| {
        format!("{}:{}", s.file, s.line)
    });
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .env("PATH", path)
            .env("SECRET", &secret)
            .env("RUNCAST_LISTEN", &a)
            .env("RUNCAST_URL", format!("http://{a}"))
            .env("RUNCAST_HTTP_URL", format!("http://{a}"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("blocks after {where_} did not finish in 60 s"))
    .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "blocks after {where_} failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Expected output written in the docs.
    for c in clients {
        for want in c.body.lines().filter_map(|l| l.trim().strip_prefix("# {")) {
            let want = format!("{{{want}");
            assert!(
                stdout.contains(&want),
                "{}:{}: the docs say it prints {want}, it printed:\n{stdout}",
                c.file,
                c.line
            );
        }
    }
    // The tokens the docs mint are accepted by the server the docs started.
    let statuses: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("token-status "))
        .collect();
    assert!(
        statuses.iter().all(|s| *s == "200"),
        "blocks after {where_}: a token they print is refused ({statuses:?}):\n{stdout}"
    );
    let mints = clients.iter().any(|c| c.body.contains("token"));
    assert!(
        !mints || !statuses.is_empty(),
        "blocks after {where_} mint tokens but printed none:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_examples_run_as_written() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "curl is needed (scripts/test.sh installs it)"
    );
    let all = blocks();
    assert!(all.len() >= 5, "marked blocks: {all:#?}");
    // Group by file: a server block and the client blocks after it.
    let mut i = 0;
    while i < all.len() {
        let file = &all[i].file;
        let server = (all[i].marker == "server").then_some(&all[i]);
        let start = i + usize::from(server.is_some());
        let mut end = start;
        while end < all.len() && all[end].file == *file && all[end].marker != "server" {
            end += 1;
        }
        let clients: Vec<&Block> = all[start..end].iter().collect();
        for c in &clients {
            assert!(
                c.marker.is_empty(),
                "{}:{}: unknown marker {:?}",
                c.file,
                c.line,
                c.marker
            );
        }
        run_session(server, &clients).await;
        i = end;
    }
}
