//! Example Spine map/reduce workload: counting words.
//!
//! Capabilities:
//!
//! - `wordcount.split`: UTF-8 text in, a fragment list (docs/PROTOCOL.md §11.7) out: pieces of
//!   about `fragment_bytes` bytes (default 65,536), cut at line ends (a line longer than twice
//!   that is cut between words), so no word is split. It takes its input as a file and returns
//!   fragment files ([`split_file`]): a 10 GiB text is cut with memory for one read buffer;
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
use std::io::{BufRead, BufWriter};
use std::path::{Path, PathBuf};

use serde_json::Value;
use spine_agent::{AgentBuilder, FragmentFile, JobContext, JobError, Output};
use spine_protocol::fragments;

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

/// The `fragment_bytes` argument of `wordcount.split`, or its default.
pub fn fragment_bytes(args: &serde_json::Map<String, Value>) -> Result<u64, JobError> {
    match args.get("fragment_bytes") {
        None => Ok(DEFAULT_FRAGMENT_BYTES as u64),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=1_073_741_824) => Ok(n),
            _ => Err(JobError::bad_argument(
                "fragment_bytes",
                "must be an integer from 1 to 1073741824",
            )),
        },
    }
}

/// Why [`split_stream`] stopped.
#[derive(Debug)]
pub enum SplitError {
    /// The input is not UTF-8: the offset of the first byte that is not.
    NotUtf8(u64),
    /// Reading the input or writing a piece failed.
    Io(std::io::Error),
}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitError::NotUtf8(at) => write!(f, "not UTF-8 text (byte {at})"),
            SplitError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for SplitError {
    fn from(e: std::io::Error) -> Self {
        SplitError::Io(e)
    }
}

/// Checks UTF-8 piece by piece: a character cut by a read boundary is completed by the next.
struct Utf8Check {
    /// Bytes of a character begun at the end of the last piece.
    carry: Vec<u8>,
    /// Offset of `carry`'s first byte in the input.
    at: u64,
}

impl Utf8Check {
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), SplitError> {
        // Complete a character begun in the last piece, a byte at a time (at most 3 more).
        while !self.carry.is_empty() {
            let Some((&b, rest)) = bytes.split_first() else {
                return Ok(());
            };
            self.carry.push(b);
            bytes = rest;
            match std::str::from_utf8(&self.carry) {
                Ok(_) => {
                    self.at += self.carry.len() as u64;
                    self.carry.clear();
                }
                Err(e) if e.error_len().is_none() => {}
                Err(_) => return Err(SplitError::NotUtf8(self.at)),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => self.at += bytes.len() as u64,
            Err(e) => {
                let ok = e.valid_up_to();
                if e.error_len().is_some() {
                    return Err(SplitError::NotUtf8(self.at + ok as u64));
                }
                self.at += ok as u64;
                self.carry.extend_from_slice(&bytes[ok..]);
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), SplitError> {
        match self.carry.is_empty() {
            true => Ok(()),
            false => Err(SplitError::NotUtf8(self.at)),
        }
    }
}

/// Cuts the UTF-8 text read from `input` into pieces of about `target` bytes, streaming: each
/// piece goes to the writer `open(i)` gives for piece `i`, and memory holds no more than the
/// reader's buffer. A piece ends at the first line end at or after `target` bytes; a line
/// that runs on to twice `target` is cut after the first ASCII character that is not a
/// letter or digit from there, so no word is ever split (a "word" with no such character in
/// it stays whole, however long). Returns each piece's length; empty input makes no piece.
pub fn split_stream<W: std::io::Write>(
    mut input: impl BufRead,
    target: u64,
    mut open: impl FnMut(usize) -> std::io::Result<W>,
) -> Result<Vec<u64>, SplitError> {
    let target = target.max(1);
    let mut utf8 = Utf8Check {
        carry: Vec::new(),
        at: 0,
    };
    let mut pieces = Vec::new();
    let mut out: Option<W> = None;
    let mut len = 0u64;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let room = |limit: u64| {
            buf.len()
                .min(usize::try_from(limit - len).unwrap_or(usize::MAX))
        };
        let (take, cut) = if len < target {
            // A line that ends exactly at the target ends the piece.
            let n = room(target);
            (n, len + n as u64 == target && buf[n - 1] == b'\n')
        } else if len < 2 * target {
            let lim = room(2 * target);
            match buf[..lim].iter().position(|&b| b == b'\n') {
                Some(p) => (p + 1, true),
                None => (lim, false),
            }
        } else {
            match buf
                .iter()
                .position(|b| b.is_ascii() && !b.is_ascii_alphanumeric())
            {
                Some(p) => (p + 1, true),
                None => (buf.len(), false),
            }
        };
        utf8.feed(&buf[..take])?;
        let w = match &mut out {
            Some(w) => w,
            None => out.insert(open(pieces.len())?),
        };
        w.write_all(&buf[..take])?;
        input.consume(take);
        len += take as u64;
        if cut {
            if let Some(mut w) = out.take() {
                w.flush()?;
            }
            pieces.push(len);
            len = 0;
        }
    }
    utf8.finish()?;
    if let Some(mut w) = out.take() {
        w.flush()?;
        pieces.push(len);
    }
    Ok(pieces)
}

/// `wordcount.split` on a file: cuts the text at `input` ([`split_stream`]) into files
/// `part-00000`, `part-00001`, … in `dir`, returned as fragment files in order. Memory is one
/// read buffer and one write buffer, whatever the input's size.
pub fn split_file(
    args: &serde_json::Map<String, Value>,
    input: &Path,
    dir: &Path,
) -> Result<Output, JobError> {
    let target = fragment_bytes(args)?;
    let io = |what: &str, e: std::io::Error| JobError::Retryable(format!("{what}: {e}"));
    let file = std::fs::File::open(input).map_err(|e| io("opening the input", e))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let name = |i: usize| format!("part-{i:05}");
    let path = |i: usize| -> PathBuf { dir.join(name(i)) };
    let pieces = split_stream(reader, target, |i| {
        std::fs::File::create(path(i)).map(|f| BufWriter::with_capacity(1 << 20, f))
    })
    .map_err(|e| match e {
        SplitError::NotUtf8(_) => JobError::bad_argument("input", e.to_string()),
        SplitError::Io(e) => io("splitting the input", e),
    })?;
    let files: Vec<FragmentFile> = (0..pieces.len())
        .map(|i| {
            FragmentFile::new(path(i))
                .with_name(name(i))
                .with_mime("text/plain; charset=utf-8")
        })
        .collect();
    let n = files.len();
    Ok(Output::fragment_files(files).with_meta("fragments", n))
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
                    let JobContext {
                        args,
                        input,
                        input_file,
                        work_dir,
                        ..
                    } = ctx;
                    tokio::task::spawn_blocking(move || match (cap, input_file, work_dir) {
                        ("wordcount.split", Some(file), Some(dir)) => {
                            let out = split_file(&args, &file, &dir);
                            // Read: its disk is free for the fragments' uploads now (if this
                            // fails, the agent deletes it after the job anyway).
                            std::fs::remove_file(&file).ok();
                            out
                        }
                        ("wordcount.split", ..) => Err(JobError::Failed(
                            "wordcount.split takes its input as a file".into(),
                        )),
                        ("wordcount.map", ..) => map(&input),
                        _ => reduce(&input),
                    })
                    .await
                    .map_err(|e| JobError::Failed(format!("word count task failed: {e}")))?
                },
            )
        })
        // The split step reads its input piece by piece from a file and writes its pieces to
        // files: a large input is never held in memory.
        .file_input("wordcount.split")
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
    use spine_protocol::Fragment;

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
            fragment_bytes(a.as_object().unwrap()),
            Err(JobError::BadArguments { field, .. }) if field == "fragment_bytes"
        ));
    }

    /// Appends to the last piece of a shared list (each `open` starts a new one).
    struct Sink(std::rc::Rc<std::cell::RefCell<Vec<Vec<u8>>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut v = self.0.borrow_mut();
            v.last_mut().expect("opened").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The pieces `split_stream` makes of `text`, read `buf` bytes at a time.
    fn pieces(text: &[u8], target: u64, buf: usize) -> Result<Vec<String>, SplitError> {
        let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let reader = std::io::BufReader::with_capacity(buf, text);
        let lens = split_stream(reader, target, |_| {
            out.borrow_mut().push(Vec::new());
            Ok(Sink(out.clone()))
        })?;
        let v = out.take();
        assert_eq!(lens, v.iter().map(|p| p.len() as u64).collect::<Vec<_>>());
        Ok(v.into_iter()
            .map(|p| String::from_utf8(p).expect("each piece is UTF-8"))
            .collect())
    }

    #[test]
    fn the_streaming_split_cuts_at_line_ends_near_the_target() {
        let text = "one two\nthree\nfour five six\nseven\n";
        for buf in [1, 2, 5, 64] {
            assert_eq!(
                pieces(text.as_bytes(), 6, buf).unwrap(),
                ["one two\n", "three\n", "four five six\n", "seven\n"],
                "buffer {buf}"
            );
            // A target past the end: one piece.
            assert_eq!(pieces(text.as_bytes(), 1000, buf).unwrap(), [text]);
        }
    }

    #[test]
    fn a_line_longer_than_twice_the_target_is_cut_between_words() {
        let text = "alpha beta gamma delta epsilon\nzeta\n";
        for buf in [1, 3, 64] {
            let got = pieces(text.as_bytes(), 4, buf).unwrap();
            // 8 bytes with no line end, then up to the next space.
            assert_eq!(
                got,
                ["alpha beta ", "gamma delta ", "epsilon\n", "zeta\n"],
                "buffer {buf}"
            );
            assert_eq!(got.concat(), text);
        }
        // One word longer than anything: it stays whole.
        let long = "x".repeat(50) + " y";
        assert_eq!(pieces(long.as_bytes(), 4, 8).unwrap(), [&long[..51], "y"]);
    }

    #[test]
    fn empty_input_no_trailing_newline_and_multibyte_text() {
        assert!(pieces(b"", 10, 4).unwrap().is_empty());
        assert_eq!(
            pieces(b"no newline at all", 100, 4).unwrap(),
            ["no newline at all"]
        );
        assert_eq!(
            pieces(b"ab\ncd", 2, 4).unwrap(),
            ["ab\n", "cd"],
            "the last piece has no line end"
        );
        // Characters cut by every read boundary; counts survive the split.
        let text = "état 東京 straße\nζήτα école\n東京 état\n".repeat(20);
        for (target, buf) in [(5, 1), (7, 2), (16, 3), (40, 5)] {
            let got = pieces(text.as_bytes(), target, buf).unwrap();
            assert_eq!(got.concat(), text);
            let mut joined = Counts::new();
            for p in &got {
                count_into(&mut joined, p);
            }
            assert_eq!(sorted(joined), counts(&text), "target {target}");
        }
    }

    #[test]
    fn the_streaming_split_names_the_first_byte_that_is_not_utf8() {
        for buf in [1, 4, 64] {
            match pieces(b"abc\xe6\x9d", 100, buf) {
                Err(SplitError::NotUtf8(3)) => {}
                other => panic!("truncated character, buffer {buf}: {other:?}"),
            }
            match pieces(b"abcdef\xffgh", 2, buf) {
                Err(SplitError::NotUtf8(6)) => {}
                other => panic!("invalid byte, buffer {buf}: {other:?}"),
            }
        }
    }

    #[test]
    fn split_file_writes_fragment_files_whose_counts_equal_one_count() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("input");
        let text = generated_corpus(300_000);
        std::fs::write(&input, &text).unwrap();
        let args = serde_json::json!({"fragment_bytes": 50_000});
        let out = split_file(args.as_object().unwrap(), &input, dir.path()).unwrap();
        assert_eq!(out.mime.as_deref(), Some(spine_protocol::FRAGMENTS_MIME));
        assert!(out.bytes.is_empty());
        let n = out.fragment_files.len();
        assert!((5..=6).contains(&n), "{n} fragments");
        assert_eq!(out.meta["fragments"], n);
        let mut joined = Counts::new();
        for (i, f) in out.fragment_files.iter().enumerate() {
            assert_eq!(f.name, Some(format!("part-{i:05}")));
            let piece = std::fs::read_to_string(&f.path).unwrap();
            assert!(piece.ends_with('\n') || i == n - 1);
            count_into(&mut joined, &piece);
        }
        assert_eq!(sorted(joined), counts(&text));
        // Empty input: an empty list, inline.
        std::fs::write(&input, "").unwrap();
        let out = split_file(&Default::default(), &input, dir.path()).unwrap();
        assert!(out.fragment_files.is_empty());
        assert_eq!(fragments::decode(&out.bytes).unwrap(), vec![]);
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
