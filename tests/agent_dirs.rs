//! `tether agent` refuses to start on a work or state directory another user made or can swap:
//! memory images there are restored by CRIU as root. Needs root (to make a directory owned by
//! nobody); fails, never skips, without it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn needs_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (to make directories owned by nobody): run them as root"
    );
}

/// Runs `tether agent` with `work` as its work directory; its exit status and stderr.
fn agent_with_work_dir(work: &Path, state: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--certs",
            "/nonexistent/certs",
        ])
        .args(["--allow-source", "src", "--allow-service", "10.77.0.0/24"])
        .arg("--work-dir")
        .arg(work)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run tether agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_work_directory_made_by_nobody_or_a_symlink_makes_the_agent_refuse_to_start() {
    needs_root();
    let t = tempfile::tempdir().expect("tempdir");
    let state = t.path().join("state");

    // Made first by another user, with the right mode.
    let taken = t.path().join("taken");
    std::fs::create_dir(&taken).expect("dir");
    std::fs::set_permissions(&taken, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    nix::unistd::chown(&taken, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let (ok, said) = agent_with_work_dir(&taken, &state);
    assert!(!ok, "the agent must not start: {said}");
    assert!(
        said.contains(&taken.display().to_string()) && said.contains("owned by uid 65534"),
        "the message names the directory and why: {said}"
    );

    // A symbolic link to a directory that looks fine.
    let real = t.path().join("real");
    std::fs::create_dir(&real).expect("dir");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let (ok, said) = agent_with_work_dir(&link, &state);
    assert!(!ok, "the agent must not start: {said}");
    assert!(
        said.contains(&link.display().to_string()) && said.contains("symbolic link"),
        "{said}"
    );

    // And as the state directory, with a mode others can read.
    let open = t.path().join("open");
    std::fs::create_dir(&open).expect("dir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (ok, said) = agent_with_work_dir(&real, &open);
    assert!(!ok, "the agent must not start: {said}");
    assert!(said.contains("0755"), "{said}");
}
