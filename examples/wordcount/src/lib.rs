//! Example Spine map/reduce workload: counting words.
//!
//! Capabilities:
//!
//! - `wordcount.split`: UTF-8 text in, a fragment list (docs/PROTOCOL.md §11.7) out: pieces of
//!   about `fragment_bytes` bytes (default 65,536), cut between words so no word is split;
//! - `wordcount.map`: UTF-8 text in, its word counts out;
//! - `wordcount.reduce`: a fragment list of word counts in (map outputs or its own outputs),
//!   their sum out.
//!
//! **Tokenisation**: a word is a maximal run of characters that are Unicode letters or digits
//! (Rust's `char::is_alphanumeric`: the `Alphabetic` or `Numeric` property), lower-cased with
//! Unicode case mapping (`str::to_lowercase`). Everything else — spaces, punctuation, symbols,
//! apostrophes, hyphens — separates words: "don't" is "don" and "t", "état-major" is "état" and
//! "major", "Straße" stays "straße".
//!
//! **Counts** travel as JSON (`application/json`): an array of `[word, count]` pairs sorted by
//! count, highest first, then by word (byte order of the UTF-8 text) — the final output's order
//! too. Metadata of map and reduce results: `words` (total) and `distinct`.

use std::collections::HashMap;

use serde_json::Value;
use spine_agent::{AgentBuilder, JobContext, JobError, Output};
use spine_protocol::fragments::{self, Fragment};

/// The bundled corpus (`spine up --demo` counts it): the texts in `corpus/` and the project's
/// own documentation, as (name, text).
pub const CORPUS: &[(&str, &str)] = &[
    (
        "corpus/dispatch.txt",
        include_str!("../corpus/dispatch.txt"),
    ),
    ("corpus/atelier.txt", include_str!("../corpus/atelier.txt")),
    (
        "corpus/werkstatt.txt",
        include_str!("../corpus/werkstatt.txt"),
    ),
    ("README.md", include_str!("../../../README.md")),
    (
        "docs/PROTOCOL.md",
        include_str!("../../../docs/PROTOCOL.md"),
    ),
    ("docs/agent.md", include_str!("../../../docs/agent.md")),
    (
        "docs/dispatcher.md",
        include_str!("../../../docs/dispatcher.md"),
    ),
    ("docs/server.md", include_str!("../../../docs/server.md")),
];

/// Word counts, in any order.
pub type Counts = HashMap<String, u64>;

/// Default size of the pieces `wordcount.split` makes.
pub const DEFAULT_FRAGMENT_BYTES: usize = 64 * 1024;

/// The words of `text`, lower-cased, in order.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// Adds the words of `text` to `counts`.
pub fn count_into(counts: &mut Counts, text: &str) {
    for w in words(text) {
        *counts.entry(w).or_insert(0) += 1;
    }
}

/// Sorted by count (highest first), then by word.
pub fn sorted(counts: Counts) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The wire form of counts: `[[word, count], …]`, sorted.
pub fn to_json(counts: Counts) -> Vec<u8> {
    // Written straight from the pairs (no JSON value tree: a map step's output has tens of
    // thousands of them). Strings and integers always serialise.
    serde_json::to_vec(&sorted(counts)).unwrap_or_else(|_| b"[]".to_vec())
}

/// One `[word, count]` pair of the wire form, the word borrowed from the input when it has no
/// escapes (so merging a word already counted allocates nothing).
#[derive(serde::Deserialize)]
struct Pair<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>, u64);

/// Reads counts in their wire form, adding them to `counts`.
pub fn add_json(counts: &mut Counts, bytes: &[u8]) -> Result<(), String> {
    let list: Vec<Pair<'_>> = serde_json::from_slice(bytes)
        .map_err(|e| format!("not word counts (a JSON array of [word, count] pairs): {e}"))?;
    for Pair(w, n) in list {
        match counts.get_mut(w.as_ref()) {
            Some(c) => *c = c.saturating_add(n),
            None => {
                counts.insert(w.into_owned(), n);
            }
        }
    }
    Ok(())
}

/// Cuts `text` into pieces of about `target` bytes (at least one character each), each cut
/// falling on a character that is not part of a word, so every word stays whole.
pub fn split(text: &str, target: usize) -> Vec<&str> {
    let target = target.max(1);
    let mut pieces = Vec::new();
    let mut start = 0;
    while text.len() - start > target {
        let mut cut = start + target;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        // Move forward to the first separator at or after the target.
        match text[cut..].find(|c: char| !c.is_alphanumeric()) {
            Some(off) => {
                let sep = cut + off;
                let sep_len = text[sep..].chars().next().map_or(1, char::len_utf8);
                pieces.push(&text[start..sep + sep_len]);
                start = sep + sep_len;
            }
            None => break,
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

fn text_input(input: &[u8]) -> Result<&str, JobError> {
    std::str::from_utf8(input).map_err(|e| {
        JobError::bad_argument(
            "input",
            format!("not UTF-8 text (byte {})", e.valid_up_to()),
        )
    })
}

fn counts_output(counts: Counts) -> Output {
    let total: u64 = counts.values().sum();
    let distinct = counts.len();
    Output::bytes(to_json(counts))
        .with_mime("application/json")
        .with_meta("words", total)
        .with_meta("distinct", distinct)
}

/// `wordcount.map`.
pub fn map(input: &[u8]) -> Result<Output, JobError> {
    let mut counts = Counts::new();
    count_into(&mut counts, text_input(input)?);
    Ok(counts_output(counts))
}

/// `wordcount.reduce`.
pub fn reduce(input: &[u8]) -> Result<Output, JobError> {
    let list = fragments::decode(input).map_err(|e| JobError::bad_argument("input", e))?;
    let mut counts = Counts::new();
    for (i, f) in list.iter().enumerate() {
        add_json(&mut counts, &f.data)
            .map_err(|e| JobError::bad_argument("input", format!("fragment {i}: {e}")))?;
    }
    Ok(counts_output(counts))
}

/// `wordcount.split`.
pub fn split_job(args: &serde_json::Map<String, Value>, input: &[u8]) -> Result<Output, JobError> {
    let target = match args.get("fragment_bytes") {
        None => DEFAULT_FRAGMENT_BYTES,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=1_073_741_824) => n as usize,
            _ => {
                return Err(JobError::bad_argument(
                    "fragment_bytes",
                    "must be an integer from 1 to 1073741824",
                ))
            }
        },
    };
    let pieces: Vec<Fragment> = split(text_input(input)?, target)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            Fragment::new(p.as_bytes().to_vec())
                .with_name(format!("part-{i:05}"))
                .with_mime("text/plain; charset=utf-8")
        })
        .collect();
    let n = pieces.len();
    Ok(Output::bytes(fragments::encode(&pieces))
        .with_mime(spine_protocol::FRAGMENTS_MIME)
        .with_meta("fragments", n))
}

/// Adds `wordcount.split`, `wordcount.map` and `wordcount.reduce` to an agent (the work runs
/// on the blocking pool). Each accepts only `fragment_bytes`, the split step's argument: every
/// step of a map/reduce job carries the submission's arguments (docs/PROTOCOL.md §11.7), and
/// map and reduce ignore it. Any other argument is refused with `bad-arguments` naming it.
pub fn register(builder: AgentBuilder) -> AgentBuilder {
    ["wordcount.split", "wordcount.map", "wordcount.reduce"]
        .into_iter()
        .fold(builder, |b, cap| {
            b.capability_args(
                cap,
                None,
                &["fragment_bytes"],
                move |ctx: JobContext| async move {
                    let JobContext { args, input, .. } = ctx;
                    tokio::task::spawn_blocking(move || match cap {
                        "wordcount.split" => split_job(&args, &input),
                        "wordcount.map" => map(&input),
                        _ => reduce(&input),
                    })
                    .await
                    .map_err(|e| JobError::Failed(format!("word count task failed: {e}")))?
                },
            )
        })
}

/// A corpus of `bytes` bytes, the same every run: lines of words drawn from a synthetic
/// vocabulary of 50,000 words, their frequencies following Zipf's law as in natural text.
pub fn generated_corpus(bytes: usize) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2008);
    let letters = b"etaoinshrdlucmfwypvbgkjqxz";
    let vocab: Vec<String> = (0..50_000)
        .map(|_| {
            let len = rng.random_range(2..=10);
            (0..len)
                .map(|_| letters[(rng.random::<f64>().powi(2) * 26.0) as usize % 26] as char)
                .collect()
        })
        .collect();
    let mut text = String::with_capacity(bytes + 64);
    let mut on_line = 0;
    while text.len() < bytes {
        // Log-uniform rank: P(rank) ∝ 1 / rank, Zipf's law with exponent 1.
        let rank = (vocab.len() as f64).powf(rng.random::<f64>()) as usize;
        let w = &vocab[rank.saturating_sub(1).min(vocab.len() - 1)];
        text.push_str(w);
        on_line += 1;
        text.push(if on_line % 12 == 0 { '\n' } else { ' ' });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(text: &str) -> Vec<(String, u64)> {
        let mut c = Counts::new();
        count_into(&mut c, text);
        sorted(c)
    }

    fn pairs(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(w, n)| (w.to_string(), *n)).collect()
    }

    #[test]
    fn tokenisation_is_lower_case_letters_and_digits() {
        let w: Vec<String> =
            words("Don't STOP—the état-major's 42nd Straße, ÉCOLE 東京 x_y").collect();
        assert_eq!(
            w,
            [
                "don", "t", "stop", "the", "état", "major", "s", "42nd", "straße", "école", "東京",
                "x", "y"
            ]
        );
        assert_eq!(words("  ...  ").count(), 0);
    }

    #[test]
    fn sorted_by_count_then_word() {
        assert_eq!(
            counts("b a c b a b d"),
            pairs(&[("b", 3), ("a", 2), ("c", 1), ("d", 1)])
        );
    }

    #[test]
    fn map_then_reduce_equals_one_count() {
        let parts = ["The cat sat.", "the CAT ran; a dog", "sat sat"];
        let maps: Vec<Fragment> = parts
            .iter()
            .map(|p| Fragment::new(map(p.as_bytes()).unwrap().bytes))
            .collect();
        // Reduce in two levels, as a tree would: reduce(reduce(m0, m1), m2).
        let r1 = reduce(&fragments::encode(&maps[..2])).unwrap();
        let r2 = reduce(&fragments::encode(&[
            Fragment::new(r1.bytes),
            maps[2].clone(),
        ]))
        .unwrap();
        let mut got = Counts::new();
        add_json(&mut got, &r2.bytes).unwrap();
        assert_eq!(sorted(got), counts(&parts.join(" ")));
        assert_eq!(r2.meta["words"], 10);
        assert_eq!(r2.meta["distinct"], 6);
        let text: Value = serde_json::from_slice(&r2.bytes).unwrap();
        assert_eq!(text[0], serde_json::json!(["sat", 3]));
    }

    #[test]
    fn split_keeps_words_whole_and_loses_nothing() {
        let text = "alpha beta, gamma\ndelta épsilon ζήτα 東京 end";
        for target in [1, 3, 7, 12, 100] {
            let pieces = split(text, target);
            assert_eq!(pieces.concat(), text, "target {target}");
            let mut joined = Counts::new();
            for p in &pieces {
                count_into(&mut joined, p);
            }
            assert_eq!(sorted(joined), counts(text), "target {target}");
        }
        assert_eq!(split(text, 100).len(), 1);
        assert!(split(text, 7).len() >= 5);
        assert!(split("", 10).is_empty());
    }

    #[test]
    fn bad_input_names_the_problem() {
        match map(&[0xff, 0xfe]) {
            Err(JobError::BadArguments { field, message }) => {
                assert_eq!(field, "input");
                assert!(message.contains("not UTF-8"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        match reduce(&fragments::encode(&[Fragment::new(b"{}".to_vec())])) {
            Err(JobError::BadArguments { message, .. }) => {
                assert!(message.contains("fragment 0: not word counts"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let a = serde_json::json!({"fragment_bytes": 0});
        assert!(matches!(
            split_job(a.as_object().unwrap(), b"x"),
            Err(JobError::BadArguments { field, .. }) if field == "fragment_bytes"
        ));
    }

    #[test]
    fn the_generated_corpus_is_the_same_every_run_and_skewed() {
        // The corpus is part of the figure: a change to it must be a deliberate one.
        let a = generated_corpus(100_000);
        assert_eq!(a, generated_corpus(100_000));
        assert!(a.len() >= 100_000 && a.len() < 100_020);
        let mut counts = Counts::new();
        count_into(&mut counts, &a);
        let sorted = sorted(counts);
        let total: u64 = sorted.iter().map(|(_, n)| n).sum();
        // Zipf-like: the 100 most frequent words are a large share of the text.
        let top: u64 = sorted.iter().take(100).map(|(_, n)| n).sum();
        assert!(top * 5 > total, "top 100 = {top} of {total}");
    }
}
