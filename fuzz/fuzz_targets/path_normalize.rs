//! The waypoint's path normalisation (`waypoint::path`), which every request's path goes
//! through before routing, policy and forwarding: what an HTTP client writes in its
//! request line, under each `--path-escaped-slashes` setting.
//!
//! Invariants besides "no panic": the normal form is its own normal form; it starts with
//! `/` (or is `*`); it has no `.` or `..` segment, no empty one but a trailing slash's, no
//! percent-encoding of an unreserved character, and under the default setting no slash or
//! backslash in any spelling other than `/`; the query is kept byte for byte.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use weft::waypoint::path::{self, EscapedSlashes};

#[derive(Arbitrary, Clone, Copy, Debug)]
enum Slashes {
    Reject,
    Keep,
    Decode,
}

fuzz_target!(|input: (Slashes, &str)| {
    let (slashes, raw) = input;
    let slashes = match slashes {
        Slashes::Reject => EscapedSlashes::Reject,
        Slashes::Keep => EscapedSlashes::Keep,
        Slashes::Decode => EscapedSlashes::Decode,
    };
    let Ok(normal) = path::normalize_path_and_query(raw, slashes) else {
        return;
    };
    assert_eq!(
        path::normalize_path_and_query(&normal, slashes).as_deref(),
        Ok(normal.as_str()),
        "normalising {raw:?} twice changed it"
    );
    let (normal_path, query) = split(&normal);
    assert_eq!(query, split(raw).1, "the query of {raw:?} changed");
    if normal_path == "*" {
        return;
    }
    assert!(
        normal_path.starts_with('/'),
        "{normal_path:?} is not absolute"
    );
    // A trailing slash is kept (`/admin/` is not `/admin`): only the last segment may be
    // empty.
    let segments: Vec<&str> = normal_path[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        assert!(
            !matches!(*segment, "." | "..") && (last || !segment.is_empty()),
            "{normal_path:?} (from {raw:?}) has an empty or dot segment"
        );
    }
    let bytes = normal_path.as_bytes();
    for (i, _) in normal_path.match_indices('%') {
        let byte = std::str::from_utf8(&bytes[i + 1..i + 3])
            .ok()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| panic!("{normal_path:?} has a bad percent-encoding"));
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "{normal_path:?} keeps an encoded unreserved character"
        );
        if slashes == EscapedSlashes::Reject {
            assert!(
                byte != b'/' && byte != b'\\',
                "{normal_path:?} keeps %2F or %5C"
            );
        }
    }
    if slashes != EscapedSlashes::Keep {
        assert!(
            !normal_path.contains('\\'),
            "{normal_path:?} keeps a backslash"
        );
    }
});

fn split(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}
