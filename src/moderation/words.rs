//! The word list: the moderation file compiled once into one Aho-Corasick
//! automaton for every word and one regex for every `/pattern/`, then only
//! read. A reload builds a new list and swaps it in whole ([`super::Filter`]).
//!
//! The file, one entry a line (surrounding whitespace trimmed; blank lines
//! and lines starting with `#` skipped):
//! - `/pattern/`: a regular expression (Rust `regex` syntax), matched
//!   anywhere in the text, case-insensitively unless it says `(?-i)`. It
//!   decides its own edges: write `\b` for whole words.
//! - anything else: a word or a phrase, matched case-insensitively and only
//!   as a whole word: a match whose neighbour on either side is a letter or
//!   a digit does not count, so `ass` blocks "ass" and "ASS!" but not
//!   "class" or "assistant" (the Scunthorpe problem). An edge of the entry
//!   that is not itself a letter or digit (`:(`, `f*ck`) needs no boundary
//!   there. Case is folded one character to one character (Unicode simple
//!   lowercase), so `Scheiße` also blocks "SCHEIßE" but not "SCHEISSE".

use std::ops::{ControlFlow, Range};

use aho_corasick::{AhoCorasick, MatchKind};
use regex::{Regex, RegexBuilder};

/// The largest moderation file read: far above any real list (a 10,000-word
/// list is ~100 KiB), small enough that a wrong path (a log file) is
/// refused rather than compiled.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Compiled regexes are bounded in memory (regex's own default is 10 MiB per
/// regex); one list-wide program stays below this.
const REGEX_SIZE_LIMIT: usize = 32 * 1024 * 1024;

/// Why a list was not compiled: the line (from 1) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the /patterns/ together are too large to compile: {0}")]
    TooComplex(String),
}

/// A compiled list. Cheap to read from many threads at once.
#[derive(Debug)]
pub struct WordList {
    /// Every word, case-folded; None when the list has none.
    words: Option<AhoCorasick>,
    /// Per word: whether its first and its last character are a letter or a
    /// digit, i.e. whether a match needs a word boundary on that side.
    edges: Vec<(bool, bool)>,
    /// Every `/pattern/` as one alternation; None when the list has none.
    patterns: Option<Regex>,
    pattern_count: usize,
}

/// A letter or a digit in any script: what a whole-word match may not touch.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric()
}

/// One character to one character: ASCII lowercased, others by their
/// Unicode lowercase when that is a single character (so a text and its
/// folded form have the same characters, position for position).
fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

/// A text folded, with where each of its characters starts in the folded
/// and in the original text.
struct Folded {
    text: String,
    /// (folded offset, original offset) of each character, in order.
    starts: Vec<(usize, usize)>,
    original_len: usize,
}

impl Folded {
    fn new(original: &str) -> Folded {
        let mut text = String::with_capacity(original.len());
        let mut starts = Vec::with_capacity(original.len());
        for (at, c) in original.char_indices() {
            starts.push((text.len(), at));
            text.push(fold_char(c));
        }
        Folded {
            text,
            starts,
            original_len: original.len(),
        }
    }

    /// The original offset of a folded offset that starts a character (or
    /// is the end).
    fn original(&self, folded_at: usize) -> usize {
        match self.starts.binary_search_by_key(&folded_at, |(f, _)| *f) {
            Ok(i) => self.starts[i].1,
            Err(_) => self.original_len,
        }
    }
}

impl WordList {
    /// A list that matches nothing.
    pub fn empty() -> WordList {
        WordList {
            words: None,
            edges: Vec::new(),
            patterns: None,
            pattern_count: 0,
        }
    }

    /// Compile the text of a moderation file (format in the module doc).
    pub fn parse(text: &str) -> Result<WordList, ListError> {
        let mut words: Vec<String> = Vec::new();
        let mut edges = Vec::new();
        let mut patterns: Vec<&str> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason: String| ListError::Line {
                line: i + 1,
                reason,
            };
            if line.len() >= 2 && line.starts_with('/') && line.ends_with('/') {
                let pattern = &line[1..line.len() - 1];
                if pattern.is_empty() {
                    return Err(error("an empty /pattern/ would match every message".into()));
                }
                // Compiled alone first, so a mistake is reported with its line.
                let re = RegexBuilder::new(pattern)
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| error(format!("bad /pattern/: {e}")))?;
                if re.is_match("") {
                    return Err(error(
                        "this /pattern/ matches an empty text, so it would match every message"
                            .into(),
                    ));
                }
                patterns.push(pattern);
            } else {
                let folded: String = line.chars().map(fold_char).collect();
                let first = folded.chars().next().is_some_and(is_word_char);
                let last = folded.chars().next_back().is_some_and(is_word_char);
                edges.push((first, last));
                words.push(folded);
            }
        }
        let pattern_count = patterns.len();
        let patterns = if patterns.is_empty() {
            None
        } else {
            // Each in its own group: flags and alternations stay inside it.
            let joined = patterns
                .iter()
                .map(|p| format!("(?:{p})"))
                .collect::<Vec<_>>()
                .join("|");
            Some(
                RegexBuilder::new(&joined)
                    .case_insensitive(true)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| ListError::TooComplex(e.to_string()))?,
            )
        };
        let words = if words.is_empty() {
            None
        } else {
            // Overlapping search (Standard semantics) reports every match, so
            // one that fails its boundary ("ass" in "class") cannot hide a
            // valid one that overlaps it. ASCII case is folded by the
            // automaton; other case by `Folded`, only for non-ASCII texts.
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .ascii_case_insensitive(true)
                    .build(&words)
                    .map_err(|e| ListError::TooComplex(e.to_string()))?,
            )
        };
        Ok(WordList {
            words,
            edges,
            patterns,
            pattern_count,
        })
    }

    /// How many words and how many /patterns/ the list holds.
    pub fn counts(&self) -> (usize, usize) {
        (self.edges.len(), self.pattern_count)
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_none() && self.patterns.is_none()
    }

    /// Whether anything in the list matches `text`.
    pub fn is_match(&self, text: &str) -> bool {
        self.each_match(text, |_| ControlFlow::Break(())).is_break()
    }

    /// `text` with every match masked (each character but whitespace turned
    /// into `*`), or None if nothing matched.
    pub fn mask(&self, text: &str) -> Option<String> {
        let mut hits: Vec<Range<usize>> = Vec::new();
        let _ = self.each_match(text, |r| {
            hits.push(r);
            ControlFlow::Continue(())
        });
        if hits.is_empty() {
            return None;
        }
        hits.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(hits.len());
        for r in hits {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut next = merged.iter().peekable();
        for (at, c) in text.char_indices() {
            while next.next_if(|r| r.end <= at).is_some() {}
            let inside = next.peek().is_some_and(|r| r.start <= at);
            out.push(if inside && !c.is_whitespace() { '*' } else { c });
        }
        Some(out)
    }

    /// Call `f` with the byte range (in `text`) of each match, until it breaks.
    fn each_match(
        &self,
        text: &str,
        mut f: impl FnMut(Range<usize>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        if let Some(ac) = &self.words {
            if text.is_ascii() {
                // The common case: the automaton folds ASCII case itself,
                // nothing is allocated.
                for m in ac.find_overlapping_iter(text) {
                    if self.whole_word(text, m.pattern().as_usize(), m.range()) {
                        f(m.range())?;
                    }
                }
            } else {
                let folded = Folded::new(text);
                for m in ac.find_overlapping_iter(&folded.text) {
                    if self.whole_word(&folded.text, m.pattern().as_usize(), m.range()) {
                        f(folded.original(m.start())..folded.original(m.end()))?;
                    }
                }
            }
        }
        if let Some(re) = &self.patterns {
            for m in re.find_iter(text) {
                if !m.is_empty() {
                    f(m.range())?;
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Whether the match of word `pattern` at `range` of `text` stands alone.
    fn whole_word(&self, text: &str, pattern: usize, range: Range<usize>) -> bool {
        let (first, last) = self.edges.get(pattern).copied().unwrap_or((true, true));
        let before_ok = !first
            || !text[..range.start]
                .chars()
                .next_back()
                .is_some_and(is_word_char);
        let after_ok = !last || !text[range.end..].chars().next().is_some_and(is_word_char);
        before_ok && after_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> WordList {
        WordList::parse(text).unwrap()
    }

    #[test]
    fn words_match_whole_and_in_any_case() {
        let l = list("ass\nbad word\n");
        assert!(l.is_match("you ass"));
        assert!(l.is_match("ASS!"));
        assert!(l.is_match("(Ass)"));
        assert!(l.is_match("what a BAD WORD."));
        assert!(!l.is_match("a class of assistants"), "Scunthorpe");
        assert!(!l.is_match("bad words"), "a phrase is whole too");
        assert!(!l.is_match("badword"));
        assert!(!l.is_match(""));
    }

    #[test]
    fn a_failed_boundary_does_not_hide_a_later_or_overlapping_match() {
        let l = list("ass\nclass act\n");
        assert!(l.is_match("class ass"));
        assert!(l.is_match("a class act"));
        assert_eq!(
            l.mask("classy ass, class").as_deref(),
            Some("classy ***, class")
        );
    }

    #[test]
    fn edges_that_are_not_letters_need_no_boundary() {
        let l = list("f*ck\n:(\n");
        assert!(l.is_match("oh f*ck"));
        assert!(l.is_match("sad:("));
        assert!(
            !l.is_match("f*cking"),
            "the last letter still needs its boundary"
        );
    }

    #[test]
    fn non_ascii_text_is_folded_and_masked_by_character() {
        let l = list("Scheiße\nдурак\n");
        assert!(l.is_match("SCHEIßE!"));
        assert!(l.is_match("ты ДУРАК"));
        assert!(!l.is_match("дураки"), "a longer word in Cyrillic");
        assert_eq!(l.mask("ну и ДУРАК.").as_deref(), Some("ну и *****."));
        // Characters before the match that change length when folded.
        assert_eq!(l.mask("ΩΩ scheiße").as_deref(), Some("ΩΩ *******"));
    }

    #[test]
    fn patterns_match_anywhere_case_insensitively_and_keep_their_own_flags() {
        let l = list("/b[a4]dw[o0]rd/\n/(?-i)CAPS/\n");
        assert!(l.is_match("such a B4DW0RD"));
        assert!(l.is_match("xxbadwordxx"), "a pattern decides its own edges");
        assert!(l.is_match("CAPS"));
        assert!(!l.is_match("caps"));
        assert_eq!(l.mask("a badword here").as_deref(), Some("a ******* here"));
    }

    #[test]
    fn masking_keeps_whitespace_and_everything_unmatched() {
        let l = list("bad word\nugly\n");
        assert_eq!(
            l.mask("so bad word and UGLY, ok").as_deref(),
            Some("so *** **** and ****, ok")
        );
        assert_eq!(l.mask("all fine"), None);
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let l = list("# a comment\n\n   \n  spam  \n#ham\n");
        assert_eq!(l.counts(), (1, 0));
        assert!(l.is_match("SPAM"));
        assert!(!l.is_match("ham"));
        assert!(WordList::parse("# nothing\n").unwrap().is_empty());
    }

    #[test]
    fn a_bad_entry_is_refused_with_its_line() {
        let e = WordList::parse("ok\n# fine\n/a(b/\n").unwrap_err();
        assert!(matches!(e, ListError::Line { line: 3, .. }), "{e}");
        assert!(e.to_string().starts_with("line 3: bad /pattern/"), "{e}");
        let e = WordList::parse("//\n").unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = WordList::parse("/x*/\n").unwrap_err();
        assert!(e.to_string().contains("every message"), "{e}");
    }

    #[test]
    fn a_thousand_words_still_find_the_one_that_matters() {
        let text: String = (0..1000).map(|i| format!("word{i}\n")).collect();
        let l = list(&text);
        assert_eq!(l.counts(), (1000, 0));
        assert!(l.is_match("this has word999 in it"));
        assert!(!l.is_match("this has word1000 in it"));
        assert!(!l.is_match("this has words in it"));
    }
}
