//! The one renderer: every read command's answer is a view that prints as
//! a table, or as JSON with `--json`.

use anyhow::Result;
use serde::Serialize;
use tabled::{builder::Builder, settings::Style};

/// A command's answer.
pub trait View: Serialize {
    fn table(&self) -> String;
}

pub fn show(view: &impl View, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
    } else {
        println!("{}", view.table());
    }
    Ok(())
}

/// A table with a header row.
pub fn table<const N: usize>(header: [&str; N], rows: impl IntoIterator<Item = [String; N]>) -> String {
    let mut b = Builder::default();
    b.push_record(header);
    for row in rows {
        b.push_record(row);
    }
    b.build().with(Style::sharp()).to_string()
}

/// A two-column table of names and values, without a header.
pub fn record(rows: impl IntoIterator<Item = (&'static str, String)>) -> String {
    let mut b = Builder::default();
    for (name, value) in rows {
        b.push_record([name.to_string(), value]);
    }
    b.build().with(Style::sharp()).to_string()
}

/// "a, b" or `none` for an empty list.
pub fn joined(items: impl IntoIterator<Item = String>, sep: &str, none: &str) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() { none.to_string() } else { items.join(sep) }
}
