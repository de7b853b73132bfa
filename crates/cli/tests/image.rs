//! The container image, built for real with buildah (from Debian) from the
//! repository's `Containerfile`: `FROM scratch` with the static musl binary
//! built on the host, since no registry is reachable here for a base image.
//! Checked as a user's cluster would run it: user 65532, the entrypoint and
//! command the chart relies on, no shell or any other file than those named,
//! and a binary that is static and runs in the image's root alone.
//!
//! The binary: `$RUNCAST_STATIC_BIN` (scripts/test.sh builds it), or built
//! here with cargo when that is not set.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn static_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("RUNCAST_STATIC_BIN") {
        return PathBuf::from(p);
    }
    let target_dir = Path::new(REPO).join("target");
    run(Command::new(env!("CARGO"))
        .current_dir(REPO)
        .args([
            "build",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "runcast-cli",
            "--bin",
            "runcast",
        ])
        .env("CARGO_TARGET_DIR", &target_dir));
    target_dir.join("x86_64-unknown-linux-musl/debug/runcast")
}

/// Whether an ELF file asks for a dynamic loader (a PT_INTERP program
/// header): a static binary has none, and runs in an image without libc.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// Every file and directory under `root`, relative to it.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() && !path.is_symlink() {
                todo.push(path);
                out.push(format!("{rel}/"));
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_image_is_the_static_binary_as_user_65532_with_no_shell() {
    let bin = static_binary();
    let elf = std::fs::read(&bin).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{} is dynamically linked",
        bin.display()
    );

    let work = tempdir();
    let ctx = work.join("context");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(&bin, ctx.join("runcast")).unwrap();
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        ctx.join("ca-certificates.crt"),
    )
    .expect("Debian's ca-certificates bundle");
    std::fs::write(
        ctx.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(ctx.join("group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();

    // A storage of the test's own (vfs: no overlay mounts needed), so the
    // machine's images are untouched and the test leaves nothing behind.
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .arg("--storage-driver")
            .arg("vfs")
            .args(args);
        run(&mut cmd)
    };
    let containerfile = format!("{REPO}/Containerfile");
    buildah(&[
        "bud",
        "--isolation",
        "chroot",
        "-f",
        &containerfile,
        "-t",
        "localhost/runcast:test",
        ctx.to_str().unwrap(),
    ]);

    let inspect = buildah(&["inspect", "--type", "image", "localhost/runcast:test"]);
    let image: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let config = &image["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/runcast"])
    );
    assert_eq!(config["Cmd"], serde_json::json!(["gateway"]));
    let ports: Vec<&String> = config["ExposedPorts"]
        .as_object()
        .expect("exposed ports")
        .keys()
        .collect();
    assert_eq!(ports, ["8080/tcp", "9464/tcp"]);

    // The root filesystem: exactly the named files, no shell.
    let container =
        String::from_utf8(buildah(&["from", "--pull-never", "localhost/runcast:test"]).stdout)
            .unwrap()
            .trim()
            .to_owned();
    let mount = String::from_utf8(buildah(&["mount", &container]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let root = PathBuf::from(&mount);
    assert_eq!(
        tree(&root),
        [
            "etc/",
            "etc/group",
            "etc/passwd",
            "etc/ssl/",
            "etc/ssl/certs/",
            "etc/ssl/certs/ca-certificates.crt",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/runcast",
        ],
        "the image holds more than the binary and its few files"
    );
    // The binary runs from the image's root alone: nothing it needs is
    // outside (chroot into the root, as the container runtime would).
    let version = run(Command::new("chroot")
        .arg(&root)
        .args(["/usr/local/bin/runcast", "--version"]));
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("runcast "),
        "runcast --version in the image said {version:?}"
    );
    let sh = Command::new("chroot").arg(&root).arg("/bin/sh").output();
    assert!(
        !sh.is_ok_and(|o| o.status.success()),
        "a shell runs in the image"
    );

    buildah(&["umount", &container]);
    buildah(&["rm", &container]);
    buildah(&["rmi", "--all", "--force"]);
    let _ = std::fs::remove_dir_all(&work);
}

/// A fresh directory for this test's files (removed at its end; left for
/// a look when it fails).
fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("runcast-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
