//! Text for messages: user input quoted short, numbers grouped.

/// Quotes user input for a message, cut short so a huge input cannot flood it.
pub fn bounded(input: &str) -> String {
    const MAX: usize = 64;
    match input.char_indices().nth(MAX) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &input[..cut], input.len()),
    }
}

/// A message cut short, so that input echoed in it cannot flood the terminal.
pub fn clip(message: &str) -> String {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        None => message.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes in all)", &message[..cut], message.len()),
    }
}

/// 1048576 as "1,048,576".
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_with_separators() {
        assert_eq!(grouped(1_048_576), "1,048,576");
        assert_eq!(grouped(4096), "4,096");
        assert_eq!(grouped(12), "12");
        assert_eq!(grouped(0), "0");
    }

    #[test]
    fn long_input_is_cut() {
        let huge = "x".repeat(1000);
        assert!(bounded(&huge).ends_with("(1000 bytes)"));
        assert!(clip(&huge).len() < 400);
        assert_eq!(bounded("ab"), "\"ab\"");
    }
}
