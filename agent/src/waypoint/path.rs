//! Request-path normalisation: the one form of a path that the waypoint routes, judges by
//! policy and forwards, so that `/%61dmin`, `//admin`, `/./admin` and `/x/../admin` are all
//! `/admin` to a DENY written for `/admin`, and to the backend.
//!
//! What it does, as Envoy's `normalize_path` (RFC 3986 §6.2.2) plus `merge_slashes`:
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3) are
//!   decoded; every other percent-encoding stays, with upper-case hex digits (§6.2.2.1);
//! - empty segments are dropped (`//` → `/`), then dot segments are removed (§5.2.4;
//!   `..` above the root stays at the root). `/a/b/..` keeps its trailing slash: `/a/`;
//! - case is kept: HTTP paths are case-sensitive.
//!
//! What it refuses ([`Error`], answered 400): a `%` without two hex digits after it, a
//! path that does not start with `/` (other than `*`), and, by default
//! ([`EscapedSlashes::Reject`]), `%2F` and `%5C` (any case) and a raw `\`: servers disagree
//! on whether they separate segments (Windows and some frameworks treat `\` as `/`, some
//! decode `%2F` before routing), so no single form can be right for every backend.
//!
//! The query is not touched ([`normalize_path_and_query`] splits it off first). Pure
//! functions, no allocation beyond the result.

use serde::Serialize;

/// How `%2F`, `%5C` and `\` in a path are treated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Refuse the request (400): the safe default.
    #[default]
    Reject,
    /// Leave them as they are (upper-case hex): they are not separators to the waypoint.
    /// Only for backends that also never treat them as separators.
    Keep,
    /// Turn all three into `/`, then normalise: for backends that treat them as `/`.
    Decode,
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the path contains an encoded slash or backslash (%2F or %5C)")]
    EscapedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a `%` that is not followed by two hex digits")]
    BadPercentEncoding,
    #[error("the path does not start with `/`")]
    NotAbsolute,
}

impl Error {
    /// Stable, snake_case reason (metric label, access-log `error`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::EscapedSlash => "path_escaped_slash",
            Error::Backslash => "path_backslash",
            Error::BadPercentEncoding => "path_bad_percent_encoding",
            Error::NotAbsolute => "path_not_absolute",
        }
    }
}

/// The normal form of `path` (no query). `*` (`OPTIONS *`) is its own normal form.
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<String, Error> {
    if path == "*" {
        return Ok(path.to_owned());
    }
    if !path.starts_with('/') {
        return Err(Error::NotAbsolute);
    }
    let decoded = decode(path, slashes)?;
    Ok(remove_dot_segments(&decoded))
}

/// [`normalize`] of the path of `path_and_query`; the query (from the first `?`) is kept
/// byte for byte.
pub fn normalize_path_and_query(
    path_and_query: &str,
    slashes: EscapedSlashes,
) -> Result<String, Error> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut normal = normalize(path, slashes)?;
    if let Some(query) = query {
        normal.push('?');
        normal.push_str(query);
    }
    Ok(normal)
}

/// Decodes unreserved percent-encodings, upper-cases the others and applies `slashes`.
/// Literal runs are copied as string slices: only ASCII is ever rewritten, so the result
/// stays valid UTF-8 without a check.
fn decode(path: &str, slashes: EscapedSlashes) -> Result<String, Error> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut literal = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push_str(&path[literal..i]);
                let byte = match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                    (Some(hi), Some(lo)) => hi << 4 | lo,
                    _ => return Err(Error::BadPercentEncoding),
                };
                match byte {
                    b'/' | b'\\' => match slashes {
                        EscapedSlashes::Reject => return Err(Error::EscapedSlash),
                        EscapedSlashes::Keep => push_encoded(&mut out, byte),
                        EscapedSlashes::Decode => out.push('/'),
                    },
                    b if is_unreserved(b) => out.push(char::from(b)),
                    b => push_encoded(&mut out, b),
                }
                i += 3;
                literal = i;
            }
            b'\\' => {
                out.push_str(&path[literal..i]);
                match slashes {
                    EscapedSlashes::Reject => return Err(Error::Backslash),
                    EscapedSlashes::Keep => out.push('\\'),
                    EscapedSlashes::Decode => out.push('/'),
                }
                i += 1;
                literal = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[literal..]);
    Ok(out)
}

/// Merges slashes and removes `.` and `..` segments of an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let mut segments: Vec<&str> = Vec::new();
    // A path ending in `/`, `/.` or `/..` names a directory: it keeps a trailing slash.
    let mut directory = false;
    for segment in raw.split('/') {
        directory = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if directory || segments.is_empty() {
        out.push('/');
    }
    out
}

fn hex(byte: Option<&u8>) -> Option<u8> {
    char::from(*byte?)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn push_encoded(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn normal(path: &str) -> String {
        normalize(path, EscapedSlashes::Reject).unwrap()
    }

    #[test]
    fn every_spelling_of_admin_is_admin() {
        for path in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "//admin",
            "///admin",
            "/./admin",
            "/foo/../admin",
            "/%2e/admin",
            "/%2E%2E/admin",
            "/../admin",
            "/x/y/../../admin",
            "/x/%2e%2e/admin",
            "/.//./admin",
        ] {
            assert_eq!(normal(path), "/admin", "{path}");
        }
    }

    #[test]
    fn case_is_kept() {
        assert_eq!(normal("/ADMIN"), "/ADMIN");
        assert_eq!(normal("/%41dmin"), "/Admin");
    }

    #[test]
    fn directories_keep_their_trailing_slash() {
        assert_eq!(normal("/"), "/");
        assert_eq!(normal("//"), "/");
        assert_eq!(normal("/admin/"), "/admin/");
        assert_eq!(normal("/admin//"), "/admin/");
        assert_eq!(normal("/admin/."), "/admin/");
        assert_eq!(normal("/a/b/.."), "/a/");
        assert_eq!(normal("/a/.."), "/");
        assert_eq!(normal("/.."), "/");
        assert_eq!(normal("/."), "/");
    }

    #[test]
    fn dots_inside_segments_are_names() {
        assert_eq!(normal("/a/.../b"), "/a/.../b");
        assert_eq!(normal("/a/..b/c."), "/a/..b/c.");
        assert_eq!(normal("/.well-known/x"), "/.well-known/x");
    }

    #[test]
    fn reserved_encodings_stay_encoded_in_upper_case() {
        assert_eq!(normal("/a%3fb"), "/a%3Fb");
        assert_eq!(normal("/a%20b%25c"), "/a%20b%25c");
        assert_eq!(normal("/%c3%a9t%C3%A9"), "/%C3%A9t%C3%A9");
        // A double encoding is decoded once at most: `%25` is not unreserved.
        assert_eq!(normal("/%2561dmin"), "/%2561dmin");
        assert_eq!(normal("/a%00b"), "/a%00b");
    }

    #[test]
    fn non_ascii_passes_through() {
        assert_eq!(normal("/été//x"), "/été/x");
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused_by_default() {
        for path in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/%2F"] {
            assert_eq!(
                normalize(path, EscapedSlashes::Reject),
                Err(Error::EscapedSlash),
                "{path}"
            );
        }
        assert_eq!(
            normalize("/a\\b", EscapedSlashes::Reject),
            Err(Error::Backslash)
        );
    }

    #[test]
    fn kept_slashes_are_not_separators() {
        let keep = |p| normalize(p, EscapedSlashes::Keep).unwrap();
        assert_eq!(keep("/a%2fb"), "/a%2Fb");
        assert_eq!(keep("/x/..%2F..%2Fadmin"), "/x/..%2F..%2Fadmin");
        assert_eq!(keep("/a\\b"), "/a\\b");
        assert_eq!(keep("/a%5cb"), "/a%5Cb");
    }

    #[test]
    fn decoded_slashes_are_separators() {
        let decode = |p| normalize(p, EscapedSlashes::Decode).unwrap();
        assert_eq!(decode("/a%2Fb"), "/a/b");
        assert_eq!(decode("/x/..%2Fadmin"), "/admin");
        assert_eq!(decode("/x\\..\\admin"), "/admin");
        assert_eq!(decode("/x%5C..%5cadmin"), "/admin");
        assert_eq!(decode("/%252F"), "/%252F");
    }

    #[test]
    fn broken_percent_encodings_are_refused() {
        for path in ["/a%", "/a%2", "/a%zz", "/a%2g", "/%%41"] {
            assert_eq!(
                normalize(path, EscapedSlashes::Keep),
                Err(Error::BadPercentEncoding),
                "{path}"
            );
        }
    }

    #[test]
    fn only_absolute_paths_and_the_asterisk_are_paths() {
        assert_eq!(normal("*"), "*");
        assert_eq!(
            normalize("admin", EscapedSlashes::Reject),
            Err(Error::NotAbsolute)
        );
        assert_eq!(
            normalize("", EscapedSlashes::Reject),
            Err(Error::NotAbsolute)
        );
    }

    #[test]
    fn the_query_is_kept_as_sent() {
        let pq = |p| normalize_path_and_query(p, EscapedSlashes::Reject);
        assert_eq!(pq("/a/./b?x=%2F&y=..//z").unwrap(), "/a/b?x=%2F&y=..//z");
        assert_eq!(pq("//a?").unwrap(), "/a?");
        assert_eq!(pq("/%7Ea?q=%7E").unwrap(), "/~a?q=%7E");
        // The path part is still checked.
        assert_eq!(pq("/a%2Fb?q"), Err(Error::EscapedSlash));
    }

    /// Paths made of the pieces that matter: separators, dots, encodings, backslashes.
    fn path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("\\".to_owned()),
            Just("%".to_owned()),
            "%[0-9a-fA-F]{2}",
            "[a-zA-Z0-9~_.-]{1,3}",
            "[;:@!$&'()*+,=é]",
        ];
        proptest::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    fn slashes() -> impl Strategy<Value = EscapedSlashes> {
        prop_oneof![
            Just(EscapedSlashes::Reject),
            Just(EscapedSlashes::Keep),
            Just(EscapedSlashes::Decode),
        ]
    }

    proptest! {
        #[test]
        fn normalising_twice_changes_nothing(path in path(), slashes in slashes()) {
            if let Ok(once) = normalize(&path, slashes) {
                prop_assert_eq!(normalize(&once, slashes), Ok(once.clone()));
            }
        }

        #[test]
        fn the_normal_form_has_no_empty_or_dot_segment_and_no_decodable_encoding(
            path in path(),
            slashes in slashes(),
        ) {
            if let Ok(normal) = normalize(&path, slashes) {
                prop_assert!(normal.starts_with('/'));
                for bad in ["//", "/./", "/../"] {
                    prop_assert!(!normal.contains(bad), "{} in {}", bad, normal);
                }
                prop_assert!(!normal.ends_with("/.") && !normal.ends_with("/.."));
                let bytes = normal.as_bytes();
                for (i, _) in normal.match_indices('%') {
                    let byte = hex(bytes.get(i + 1)).zip(hex(bytes.get(i + 2)));
                    let Some((hi, lo)) = byte else {
                        return Err(TestCaseError::fail(format!("broken % in {normal}")));
                    };
                    prop_assert!(!is_unreserved(hi << 4 | lo), "decodable %XX in {}", normal);
                    prop_assert!(!bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase));
                }
                if slashes == EscapedSlashes::Decode {
                    prop_assert!(!normal.contains('\\') && !normal.contains("%2F") && !normal.contains("%5C"));
                }
            }
        }

        #[test]
        fn the_default_never_lets_an_escaped_slash_through(path in path()) {
            if let Ok(normal) = normalize(&path, EscapedSlashes::Reject) {
                prop_assert!(!normal.contains('\\') && !normal.contains("%2F") && !normal.contains("%5C"));
            }
        }
    }
}
