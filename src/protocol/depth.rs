//! A nesting-depth guard run on raw bytes before any JSON parser sees them.
//!
//! Parsers and `serde` recurse once per nesting level (building, converting
//! and dropping values), so a 32 KB frame of `[[[[...` overflows a runtime
//! thread's stack and aborts the whole process. This scan is iterative and
//! allocation-free: one pass over the bytes, tracking only whether it is
//! inside a string. It does not validate JSON; the parser does that after.

/// Deepest nesting accepted in any client JSON (frames and HTTP bodies). A
/// frame is one level, an attachment object two; 32 leaves room for clients'
/// own metadata while keeping every recursive walk shallow.
pub const MAX_DEPTH: usize = 32;

/// `Err(depth)` as soon as an array or object opens deeper than `max`.
pub fn check(buf: &[u8], max: usize) -> Result<(), usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in buf {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(depth);
                }
            }
            // Unbalanced closers are the parser's to report; never underflow.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_up_to_the_limit_and_refuses_beyond() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check(ok.as_bytes(), MAX_DEPTH), Ok(()));
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert_eq!(check(deep.as_bytes(), MAX_DEPTH), Err(MAX_DEPTH + 1));
        let objects = r#"{"a":{"b":{"c":{}}}}"#;
        assert_eq!(check(objects.as_bytes(), 4), Ok(()));
        assert_eq!(check(objects.as_bytes(), 3), Err(4));
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let s = format!(r#"{{"content":"{}"}}"#, "[{".repeat(1000));
        assert_eq!(check(s.as_bytes(), 2), Ok(()));
        // An escaped quote does not end the string.
        let s = r#"{"a":"\"[[[[[[","b":1}"#;
        assert_eq!(check(s.as_bytes(), 1), Ok(()));
        // An escaped backslash does.
        let s = r#"{"a":"\\","b":[[[]]]}"#;
        assert_eq!(check(s.as_bytes(), 3), Err(4));
    }

    #[test]
    fn unbalanced_input_never_underflows() {
        assert_eq!(check(b"]]]]}}}[", 1), Ok(()));
        assert_eq!(check(b"", 1), Ok(()));
    }
}
