//! A ListProducts `query` as words, and the full-text query each backend's
//! engine is given for them (MySQL/MariaDB `MATCH … AGAINST (… IN BOOLEAN
//! MODE)`, SQLite FTS5 `MATCH`).
//!
//! The user's text is never handed to an engine's query parser as is: it is
//! cut into words of letters, digits and `_` (what both engines index as a
//! word: InnoDB's tokenizer keeps `_` inside a word, and the FTS5 table is
//! declared with `tokenchars '_'` to do the same), so no operator, quote or
//! parenthesis survives; FTS5 words are quoted besides, so `AND`, `OR`,
//! `NOT` and `NEAR` are plain words.
//!
//! Every word is required, the last one as a prefix. InnoDB does not index
//! words shorter than `innodb_ft_min_token_size` (3, a server setting) and a
//! required word it does not index matches nothing, so such words are dropped
//! from both backends' queries alike. (Stopwords do not matter: the MySQL
//! index is created without a stopword list, migrations/mysql/0006.) The last
//! word, a prefix, is kept whatever its length: a prefix is matched against
//! the indexed words (MariaDB 10.11 answers `+te*` with the words that begin
//! so). One difference remains, documented in the README: a prefix shorter
//! than 3 characters also finds, on SQLite only, a catalogue word shorter than
//! 3 characters (FTS5 indexes every word; InnoDB does not index those).

use storegate::db::Backend;
use unicode_normalization::{UnicodeNormalization as _, char::is_combining_mark};

/// InnoDB's minimum indexed word length (`innodb_ft_min_token_size`).
const MIN_WORD_CHARS: usize = 3;
/// InnoDB's maximum indexed word length (`innodb_ft_max_token_size`).
const MAX_WORD_CHARS: usize = 84;

/// The words a query searches for; the last one is a prefix (but in
/// [`Words::only`]). Empty: the query names no word either engine can find,
/// and matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Words {
    words: Vec<String>,
    last_is_prefix: bool,
}

impl Words {
    pub fn of(query: &str) -> Words {
        let mut words: Vec<&str> =
            query.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
        let last = words.pop();
        words.retain(|w| (MIN_WORD_CHARS..=MAX_WORD_CHARS).contains(&w.chars().count()));
        words.extend(last.filter(|w| w.chars().count() <= MAX_WORD_CHARS));
        Words { words: words.into_iter().map(str::to_owned).collect(), last_is_prefix: true }
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The query of word `index` alone, a prefix only if it is the last:
    /// what the engine is asked for when that word is the rarest of a
    /// search whose other words are common (`store::anchored`).
    pub fn only(&self, index: usize) -> Words {
        Words {
            words: self.words.get(index).cloned().into_iter().collect(),
            // `index` comes from a client's page token: any usize.
            last_is_prefix: self.words.len().checked_sub(1) == Some(index),
        }
    }

    /// For `MATCH (name, description) AGAINST (? IN BOOLEAN MODE)`:
    /// `+cast +iron +te*`, and `+tea* tea` when the last word could be a
    /// whole indexed word: InnoDB gives every match of a prefix the same
    /// relevance, so the optional whole word (which selects nothing more)
    /// ranks the products that have it, more the more often, as FTS5's
    /// bm25 ranks prefix matches by how often they occur.
    pub fn mysql(&self) -> String {
        let mut terms = self.terms(|word| format!("+{word}"), |word| format!("+{word}*"));
        if let Some(last) =
            self.words.last().filter(|w| self.last_is_prefix && w.chars().count() >= MIN_WORD_CHARS)
        {
            terms.push(' ');
            terms.push_str(last);
        }
        terms
    }

    /// For FTS5's `MATCH ?`: `"cast" "iron" "te"*` (juxtaposed phrases are
    /// all required).
    pub fn fts5(&self) -> String {
        let quoted = |word: &str| format!("\"{}\"", word.replace('"', "\"\""));
        self.terms(quoted, |word| format!("{}*", quoted(word)))
    }

    fn terms(&self, word: impl Fn(&str) -> String, prefix: impl Fn(&str) -> String) -> String {
        let Some((last, rest)) = self.words.split_last() else { return String::new() };
        let last = if self.last_is_prefix { prefix(last) } else { word(last) };
        rest.iter().map(|w| word(w)).chain([last]).collect::<Vec<_>>().join(" ")
    }
}

/// A word as both engines compare words: lowercase and without diacritics
/// ("Crème" and "creme" are one word), for matching and counting words in
/// Rust (see [`Terms`]).
pub fn fold(word: &str) -> String {
    if word.is_ascii() {
        return word.to_ascii_lowercase();
    }
    word.chars().flat_map(char::to_lowercase).nfd().filter(|c| !is_combining_mark(*c)).collect()
}

/// Which words of a product's text an engine indexes: InnoDB only those of
/// 3 to 84 characters, FTS5 every word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Indexed {
    min_chars: usize,
}

impl Indexed {
    pub fn by(backend: Backend) -> Indexed {
        match backend {
            Backend::MySql => Indexed { min_chars: MIN_WORD_CHARS },
            Backend::Sqlite => Indexed { min_chars: 1 },
        }
    }

    /// The indexed words of a product's name and description, folded, in
    /// the order they appear (a word as often as it appears).
    pub fn words(self, name: &str, description: &str) -> Vec<String> {
        self.unfolded(name, description).map(fold).collect()
    }

    /// The indexed words as they are written.
    fn unfolded<'a>(self, name: &'a str, description: &'a str) -> impl Iterator<Item = &'a str> {
        [name, description]
            .into_iter()
            .flat_map(|text| text.split(|c: char| !(c.is_alphanumeric() || c == '_')))
            .filter(move |w| {
                let chars = if w.is_ascii() { w.len() } else { w.chars().count() };
                (self.min_chars..=MAX_WORD_CHARS).contains(&chars)
            })
    }
}

/// One folded word of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// A whole word.
    Word(String),
    /// The last word as typed: any word that begins with it.
    Prefix(String),
}

impl Term {
    /// Whether this term finds `word`, folded.
    pub fn matches(&self, word: &str) -> bool {
        match self {
            Term::Word(term) => word == term,
            Term::Prefix(term) => word.starts_with(term.as_str()),
        }
    }

    /// Whether this term finds `word`, an ASCII word as written: folding it
    /// is lowercasing it, done here without a copy.
    fn matches_ascii(&self, word: &str) -> bool {
        let (term, word) = (self.text().as_bytes(), word.as_bytes());
        match self {
            Term::Word(_) => word.eq_ignore_ascii_case(term),
            Term::Prefix(_) => word.len() >= term.len() && word[..term.len()].eq_ignore_ascii_case(term),
        }
    }

    fn text(&self) -> &str {
        match self {
            Term::Word(text) | Term::Prefix(text) => text,
        }
    }
}

/// The words of a query folded, to be found in products' text by Rust
/// rather than by an engine (a search of common words, see
/// `store::broad`). The same semantics as the engines' queries of
/// [`Words`]: every term must be found, the last one as a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms(Vec<Term>);

impl Terms {
    pub fn of(words: &Words) -> Terms {
        let Some((last, rest)) = words.words.split_last() else { return Terms(Vec::new()) };
        let mut terms: Vec<Term> = rest.iter().map(|w| Term::Word(fold(w))).collect();
        terms.push(if words.last_is_prefix { Term::Prefix(fold(last)) } else { Term::Word(fold(last)) });
        Terms(terms)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Term> {
        self.0.iter()
    }

    /// How often each term occurs among the `indexed` words of a product's
    /// name and description, if every one of them does, and how many
    /// indexed words they have. (Called for every product a broad search
    /// reads: only words with other than ASCII letters are copied to fold.)
    pub fn hits(&self, indexed: Indexed, name: &str, description: &str) -> Option<(Vec<u32>, usize)> {
        let mut hits = vec![0u32; self.0.len()];
        let mut words = 0;
        for word in indexed.unfolded(name, description) {
            words += 1;
            if word.is_ascii() {
                for (term, hits) in self.0.iter().zip(&mut hits) {
                    *hits += u32::from(term.matches_ascii(word));
                }
            } else {
                let word = fold(word);
                for (term, hits) in self.0.iter().zip(&mut hits) {
                    *hits += u32::from(term.matches(&word));
                }
            }
        }
        (!self.0.is_empty() && hits.iter().all(|&n| n > 0)).then_some((hits, words))
    }
}

/// Okapi BM25 of a product whose `words` words hold each term `hits[i]`
/// times, a term's weight `idfs[i]`, where products average `average_words`
/// words: the ranking FTS5's bm25() computes, with its constants.
pub fn bm25(hits: &[u32], idfs: &[f64], words: usize, average_words: f64) -> f64 {
    const K1: f64 = 1.2;
    const B: f64 = 0.75;
    let length = 1.0 - B + B * words as f64 / average_words.max(1.0);
    hits.iter()
        .zip(idfs)
        .map(|(&hits, idf)| {
            let hits = f64::from(hits);
            idf * hits * (K1 + 1.0) / (hits + K1 * length)
        })
        .sum()
}

/// Whether the match `id` of relevance `score` comes after `after` (the
/// last page's (score, id)) in a ranking best first, ties by id: where a
/// relevance page goes on, whoever ranked it.
pub fn comes_after(score: f64, id: i64, after: Option<(f64, i64)>) -> bool {
    after.is_none_or(|(last, last_id)| score < last || (score == last && id > last_id))
}

/// A term's weight when `with` of `of` products have it: BM25's idf, never
/// negative.
pub fn idf(with: f64, of: f64) -> f64 {
    (1.0 + (of - with + 0.5) / (with + 0.5)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_required_and_the_last_is_a_prefix() {
        let words = Words::of("Cast  iron te");
        assert_eq!(words.mysql(), "+Cast +iron +te*");
        assert_eq!(Words::of("iron tea").mysql(), "+iron +tea* tea");
        assert_eq!(words.fts5(), r#""Cast" "iron" "te"*"#);
    }

    #[test]
    fn one_word_alone_is_a_prefix_only_if_it_was_the_last() {
        let words = Words::of("Cast iron tea");
        assert_eq!(words.only(1).mysql(), "+iron");
        assert_eq!(words.only(1).fts5(), r#""iron""#);
        assert_eq!(Terms::of(&words.only(1)).iter().collect::<Vec<_>>(), [&Term::Word("iron".into())]);
        assert_eq!(words.only(2).mysql(), "+tea* tea");
        assert_eq!(words.only(2).fts5(), r#""tea"*"#);
        assert!(words.only(3).is_empty());
    }

    #[test]
    fn operators_never_reach_an_engine() {
        let words = Words::of(r#"+"tea" -pot* (cup) NEAR AND ~x @2 ""#);
        assert_eq!(words.mysql(), "+tea +pot +cup +NEAR +AND +2*", "x: too short, dropped");
        assert_eq!(words.fts5(), r#""tea" "pot" "cup" "NEAR" "AND" "2"*"#);
        for only_operators in ["", "  ", "+-*\"()~<>@", "'", "%"] {
            assert!(Words::of(only_operators).is_empty(), "{only_operators:?}");
        }
    }

    #[test]
    fn words_too_short_for_innodb_are_dropped_except_the_prefix() {
        assert_eq!(Words::of("the big TEA of it").mysql(), "+the +big +TEA +it*");
        assert_eq!(Words::of("xl mug").mysql(), "+mug* mug");
        assert_eq!(Words::of("mug xl").mysql(), "+mug +xl*");
        assert_eq!(Words::of(&"z".repeat(85)).mysql(), "");
        assert_eq!(Words::of("café crème").fts5(), r#""café" "crème"*"#);
        assert_eq!(Words::of("cup_small o'brien").mysql(), "+cup_small +brien* brien");
    }

    #[test]
    fn terms_fold_case_and_accents_as_the_engines_do() {
        assert_eq!(fold("Crème"), "creme");
        assert_eq!(fold("ÇAFÉ_Ü"), "cafe_u");
        let terms = Terms::of(&Words::of("Cast IRON té"));
        assert_eq!(
            terms.iter().cloned().collect::<Vec<_>>(),
            [Term::Word("cast".into()), Term::Word("iron".into()), Term::Prefix("te".into())]
        );
        let sqlite = Indexed::by(Backend::Sqlite);
        assert_eq!(
            terms.hits(sqlite, "Cast iron Teapot", "iron, cast; tea for two"),
            Some((vec![2, 2, 2], 8))
        );
        assert_eq!(terms.hits(sqlite, "Cast teapot", ""), None);
        assert_eq!(
            Terms::of(&Words::of("creme brul")).hits(sqlite, "Crème", "brûlée"),
            Some((vec![1, 1], 2))
        );
        assert_eq!(Terms::of(&Words::of("CRÈME")).hits(sqlite, "creme", ""), Some((vec![1], 1)));
        assert_eq!(sqlite.words("Crème brûlée", "x"), ["creme", "brulee", "x"]);
    }

    #[test]
    fn innodb_leaves_short_words_out_of_its_index() {
        let terms = Terms::of(&Words::of("xl"));
        assert_eq!(terms.hits(Indexed::by(Backend::Sqlite), "Mug XL", ""), Some((vec![1], 2)));
        assert_eq!(terms.hits(Indexed::by(Backend::MySql), "Mug XL", ""), None);
        assert_eq!(terms.hits(Indexed::by(Backend::MySql), "Mug XLarge", ""), Some((vec![1], 2)));
    }

    #[test]
    fn bm25_ranks_more_hits_and_shorter_texts_first() {
        let idfs = [idf(10.0, 1000.0)];
        assert!(bm25(&[2], &idfs, 10, 10.0) > bm25(&[1], &idfs, 10, 10.0));
        assert!(bm25(&[1], &idfs, 5, 10.0) > bm25(&[1], &idfs, 20, 10.0));
        assert!(idf(10.0, 1000.0) > idf(900.0, 1000.0));
        assert!(idf(1000.0, 1000.0) > 0.0);
    }
}

/// A client's `query` as words, for any text: what reaches an engine is
/// only words of letters, digits and `_`, within InnoDB's word lengths, and
/// the Rust matching of common words finds what folding finds.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{QUERY_MAX_CHARS, check_query};

    fn word_char(c: char) -> bool {
        c.is_alphanumeric() || c == '_'
    }

    /// Text as a client may type it: engine operators and quotes among
    /// words, any Unicode, NULs, long runs.
    fn any_query() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[a-zA-Z0-9_]{1,6}",
            "\\PC{1,4}",
            proptest::sample::select(vec![
                "\"", "'", "*", "-", "+", "^", ":", "(", ")", "~", "<", ">", "@", "NEAR", "NEAR/2", "AND",
                "OR", "NOT", "{", "}", "%", "\0", " ", "\t", "\u{301}", "\u{200b}", "é", "ß", "İ", "K", "²",
            ])
            .prop_map(str::to_owned),
            "z{80,90}",
        ];
        prop_oneof![
            proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat()),
            any::<String>(),
        ]
    }

    /// The runs of word characters of `query`, in order: what both engines
    /// take as its words.
    fn runs(query: &str) -> Vec<&str> {
        query.split(|c: char| !word_char(c)).filter(|w| !w.is_empty()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 1024,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn only_words_reach_an_engine(query in any_query()) {
            let words = Words::of(&query);
            let runs = runs(&query);
            for word in &words.words {
                prop_assert!(!word.is_empty() && word.chars().all(word_char), "{word:?} of {query:?}");
            }
            // The query's words, but those InnoDB does not index (the last
            // one, the prefix, may be shorter): a word too long is dropped,
            // even the last (then the word before it is the prefix).
            let expected: Vec<&str> = match runs.split_last() {
                None => Vec::new(),
                Some((last, rest)) => rest
                    .iter()
                    .filter(|w| (MIN_WORD_CHARS..=MAX_WORD_CHARS).contains(&w.chars().count()))
                    .chain(Some(last).filter(|w| w.chars().count() <= MAX_WORD_CHARS))
                    .copied()
                    .collect(),
            };
            prop_assert_eq!(&words.words, &expected);
            prop_assert!(words.last_is_prefix);

            // MySQL boolean mode: `+word` each, `*` only at the prefix's
            // end, then at most the prefix again as an optional word.
            let mysql = words.mysql();
            let terms: Vec<&str> = mysql.split(' ').filter(|t| !t.is_empty()).collect();
            let n = words.words.len();
            prop_assert!(terms.len() == n || terms.len() == n + 1, "{mysql:?} of {query:?}");
            for (i, term) in terms.iter().enumerate() {
                let bare = match term.strip_prefix('+') {
                    Some(required) if i + 1 == n => required.strip_suffix('*'),
                    Some(required) if i < n => Some(required),
                    _ if i == n => Some(*term),
                    _ => None,
                };
                prop_assert!(
                    bare.is_some_and(|w| !w.is_empty() && w.chars().all(word_char)),
                    "{term:?} in {mysql:?} of {query:?}"
                );
            }

            // FTS5: every word a quoted phrase, the last with `*`; nothing
            // outside the quotes but the spaces between them.
            let fts5 = words.fts5();
            let mut phrases = fts5.split(' ').filter(|t| !t.is_empty()).peekable();
            let mut count = 0;
            while let Some(phrase) = phrases.next() {
                let last = phrases.peek().is_none();
                let phrase = if last { phrase.strip_suffix('*').unwrap_or(phrase) } else { phrase };
                let inner = phrase.strip_prefix('"').and_then(|p| p.strip_suffix('"'));
                prop_assert!(
                    inner.is_some_and(|w| !w.is_empty() && w.chars().all(word_char)),
                    "{phrase:?} in {fts5:?} of {query:?}"
                );
                count += 1;
            }
            prop_assert_eq!(count, words.words.len());
            prop_assert_eq!(words.is_empty(), mysql.is_empty() && fts5.is_empty());
        }

        #[test]
        fn a_query_is_refused_for_a_nul_or_its_length_only(query in any_query()) {
            let refused = check_query(&query).is_some();
            prop_assert_eq!(refused, query.contains('\0') || query.chars().count() > QUERY_MAX_CHARS);
        }

        #[test]
        fn one_word_alone_is_one_of_its_words(
            query in any_query(),
            index in prop_oneof![0..8usize, Just(usize::MAX), any::<usize>()],
        ) {
            let words = Words::of(&query);
            let only = words.only(index);
            prop_assert_eq!(only.words.first(), words.words.get(index));
            prop_assert!(only.words.len() <= 1);
            prop_assert_eq!(Terms::of(&only).len(), only.words.len());
        }

        #[test]
        fn rust_matching_finds_what_folding_finds(
            query in any_query(),
            name in any_query(),
            description in any_query(),
            mysql in any::<bool>(),
        ) {
            let indexed = Indexed::by(if mysql { Backend::MySql } else { Backend::Sqlite });
            let terms = Terms::of(&Words::of(&query));
            let words = indexed.words(&name, &description);
            let hits: Vec<u32> = terms
                .iter()
                .map(|term| words.iter().filter(|word| term.matches(word)).count() as u32)
                .collect();
            let expected = (!terms.is_empty() && hits.iter().all(|&n| n > 0)).then_some((hits, words.len()));
            prop_assert_eq!(terms.hits(indexed, &name, &description), expected);
        }
    }
}
