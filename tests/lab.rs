//! The seed's lab over a wire, `scripts/lab.sh --netns`: a guest network
//! namespace reached from a host-side namespace through a veth pair. From
//! the host side nmap must see no port open on the guest's address before
//! steering and exactly 7, 77 and 777 after, and ncat must echo through each.
//! (`.ci/run` runs the same lab with a qemu guest over a tap interface.)

use std::process::Command;

use steer_tests::{bin_dir, repo_root};

/// The value `lab.sh` reported for one of its checks, e.g.
/// `lab: nmap after steering: 7 77 777 (as expected)` -> `7 77 777`.
fn reported<'a>(stdout: &'a str, check: &str) -> &'a str {
    let prefix = format!("lab: {check}: ");
    let line =
        stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"));
    line[prefix.len()..].trim_end_matches(" (as expected)").trim()
}

#[test]
fn nmap_from_the_host_sees_exactly_the_steered_ports_over_a_veth_wire() {
    let out = Command::new(repo_root().join("scripts/lab.sh"))
        .arg("--netns")
        .env("STEER_BIN_DIR", bin_dir())
        .output()
        .expect("running scripts/lab.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab.sh failed:\n{stdout}\n{stderr}");
    assert_eq!(reported(&stdout, "nmap before steering"), "none");
    assert_eq!(reported(&stdout, "nmap after steering"), "7 77 777");
    assert_eq!(reported(&stdout, "echo through each steered port"), "7 77 777");
    assert_eq!(reported(&stdout, "nmap after detach"), "none");
    assert_eq!(stdout.lines().last(), Some("lab: passed"));
}
