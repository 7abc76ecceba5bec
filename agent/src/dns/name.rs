//! Host names as the resolver accepts them: checked before any query, so that a bad name in
//! a snapshot costs nothing on the wire and says what is wrong with it.

/// Why `host` is not a name the resolver asks for, or `None` when it is: at most 253
/// characters (one trailing dot allowed), labels of 1 to 63 letters, digits and inner
/// hyphens (RFC 1123 §2.1), and a last label that is not all digits (an IP address is not
/// a host name).
pub fn invalid(host: &str) -> Option<&'static str> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Some("empty name");
    }
    if name.len() > MAX_NAME {
        return Some("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("empty label");
        }
        if label.len() > MAX_LABEL {
            return Some("label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Some("label with a character other than a letter, digit or '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("label starting or ending with '-'");
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Some("all-numeric top-level label (an address, not a name)");
    }
    None
}

const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_names() {
        for ok in [
            "a.example.test",
            "api.example.test.",
            "localhost",
            "3com.example",
            "x-1.Example.TEST",
            &format!("{}.test", "a".repeat(63)),
            &long(61),
        ] {
            assert_eq!(invalid(ok), None, "{ok}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_host_name() {
        for bad in [
            "",
            ".",
            "a..b",
            ".a.b",
            "a.b..",
            "-a.test",
            "a-.test",
            "a_b.test",
            "*.example.test",
            "a b.test",
            "ä.test",
            "10.0.0.1",
            "a.123",
            "::1",
            &format!("{}.test", "a".repeat(64)),
            &long(62),
        ] {
            assert!(invalid(bad).is_some(), "{bad:?} accepted");
        }
    }

    /// Three 63-letter labels and one of `last` letters: 253 characters with `last` = 61.
    fn long(last: usize) -> String {
        let name = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(last),
        ]
        .join(".");
        assert_eq!(name.len(), 192 + last);
        name
    }
}
