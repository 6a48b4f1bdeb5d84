//! Text from flow data made safe for a terminal. Pod names, labels, policy names and
//! drop reasons come from the cluster (or a compromised node) and reach people's
//! terminals through every printer and pane: none of it may move the cursor, change
//! colours, reorder what is shown (bidirectional overrides, "Trojan Source") or hide
//! characters. Such characters are shown as visible `\u{..}` escapes instead.

use std::borrow::Cow;

/// Whether a character is escaped: control characters (C0, DEL, C1: ESC starts every
/// terminal sequence), bidirectional marks, embeddings, overrides and isolates,
/// invisible joiners and separators, and line or paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `s` with every unsafe character replaced by its `\u{..}` escape (borrowed when
/// nothing needs replacing, which is nearly always).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Hostile strings for the tests of every printer and pane: terminal sequences, bidi
/// overrides, invisible characters, line breaks.
pub const HOSTILE: &[&str] = &[
    "\u{1b}[31mred\u{1b}[0m",
    "\u{1b}]0;title\u{7}",
    "evil\u{202E}gnp.exe",
    "a\u{2066}b\u{2069}c",
    "zero\u{200B}width",
    "line\nbreak\rreturn",
    "tab\there",
    "c1\u{9b}31m",
    "bom\u{FEFF}",
    "ls\u{2028}ps\u{2029}",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_strings_come_out_inert_and_ordinary_ones_unchanged() {
        for h in HOSTILE {
            let p = printable(h);
            assert!(!p.chars().any(is_unsafe), "{p:?}");
            assert!(p.contains("\\u{"), "{h:?} was escaped visibly: {p}");
        }
        for ok in ["frontend/web-7d4f", "app=db", "10.244.1.2:80", "名前", "ĉu"] {
            assert!(matches!(printable(ok), Cow::Borrowed(_)), "{ok}");
        }
        assert_eq!(printable("a\u{1b}b"), "a\\u{1b}b");
    }
}
