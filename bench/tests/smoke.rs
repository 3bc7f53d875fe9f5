//! Runs the benchmark in smoke mode and checks only that it measured
//! something for every row: timings on a shared machine are not asserted.
//! Needs root, like the rest of the workspace's real-kernel tests.
//!
//! A benchmark run, not a test of steer: scripts/test.sh runs it apart
//! (`cargo test -p steer-bench --test smoke`) as the check line
//! `bench smoke: ok`, outside its `tests: N passed` count.

use std::process::Command;

use serde_json::Value;

fn assert_positive_numbers(section: &str, row: &Value) {
    let fields = row.as_object().unwrap_or_else(|| panic!("{section} row is not an object: {row}"));
    let numbers: Vec<_> = fields.iter().filter(|(_, v)| v.is_number()).collect();
    assert!(!numbers.is_empty(), "{section} row has no numbers: {row}");
    for (name, value) in numbers {
        assert!(value.as_f64().is_some_and(|v| v > 0.0), "{section} row {row}: {name} is not positive");
    }
}

#[test]
fn quick_json_run_measures_every_row() {
    let out = Command::new(env!("CARGO_BIN_EXE_steer-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("running steer-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "steer-bench --quick --json failed: {stderr}");
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("output is not JSON ({e}); stderr: {stderr}"));

    for section in ["connection_rate", "program_cost", "program_cost_by_set", "control_plane"] {
        let rows = report[section].as_array().unwrap_or_else(|| panic!("no {section} array in {report}"));
        assert!(!rows.is_empty(), "{section} has no rows");
        for row in rows {
            assert_positive_numbers(section, row);
        }
    }
    // Servers followed by the kernel: the followed TCP rows at least,
    // unless the kernel cannot follow (then a skipped line says why).
    let skipped = report["skipped"].to_string();
    if !skipped.contains("\"following servers\"") {
        for section in ["restarts", "latency"] {
            let rows = report["following"][section].as_array().unwrap_or_else(|| panic!("no following.{section}"));
            assert!(
                rows.iter().any(|r| r["way"] == "followed" && r["protocol"] != "udp"),
                "following.{section} has no followed TCP row: {rows:?}"
            );
            for row in rows {
                let connections = row.get("connections").or(row.get("samples"));
                assert!(connections.and_then(Value::as_u64).is_some_and(|n| n > 0), "following.{section}: {row}");
            }
        }
    }
    let tracing = report["tracing"].as_array().unwrap_or_else(|| panic!("no tracing array in {report}"));
    assert_eq!(tracing.len(), 4, "{report}");
    for row in tracing {
        for field in ["hit_ns", "miss_ns", "unrelated_ns"] {
            assert!(row[field].as_f64().is_some_and(|v| v > 0.0), "tracing row {row}: {field} is not positive");
        }
    }
    // Every decision sent: three lookups a run.
    assert!(tracing[1]["sent"].as_u64().is_some_and(|n| n > 0) && tracing[1]["lost"] == 0, "{}", tracing[1]);
    let tests: Vec<_> =
        report["connection_rate"].as_array().unwrap().iter().map(|r| r["test"].as_str().unwrap_or("")).collect();
    assert!(
        tests.iter().any(|t| t.starts_with("tcp")) && tests.iter().any(|t| t.starts_with("udp")),
        "missing a protocol: {tests:?}"
    );
}
