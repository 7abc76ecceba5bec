//! Reading the agent's `/metrics` (OpenMetrics / Prometheus text): enough of a parser to ask
//! "what is the value of this metric for these labels".

use std::collections::BTreeMap;

/// One sample: a metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses exposition text; comment lines and lines it cannot read are skipped.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Scrape { samples }
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples' values (0 when none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// `name{k="v",...} value [timestamp]` or `name value`.
fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(open) => (&line[..open], &line[open + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Sample {
                name: name.to_string(),
                labels: BTreeMap::new(),
                value: value.split_whitespace().next()?.parse().ok()?,
            });
        }
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            rest = after;
            break;
        }
        let (key, after_key) = rest.split_once("=\"")?;
        // Values escape `"` and `\` with a backslash.
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => value.push(chars.next()?.1),
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        rest = &after_key[end + 1..];
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value: rest.split_whitespace().next()?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_labels_and_escapes() {
        let scrape = Scrape::parse(
            "# TYPE weft_tcp_sent_bytes counter\n\
             weft_tcp_sent_bytes_total{reporter=\"source\",path=\"a\\\"b\"} 1024\n\
             weft_agent_enrolled_pods 3\n\
             # EOF\n",
        );
        assert_eq!(
            scrape.sum("weft_tcp_sent_bytes_total", &[("reporter", "source")]),
            1024.0
        );
        assert_eq!(
            scrape
                .matching("weft_tcp_sent_bytes_total", &[("path", "a\"b")])
                .count(),
            1
        );
        assert_eq!(scrape.sum("weft_agent_enrolled_pods", &[]), 3.0);
        assert_eq!(
            scrape.sum("weft_tcp_sent_bytes_total", &[("reporter", "x")]),
            0.0
        );
    }
}
