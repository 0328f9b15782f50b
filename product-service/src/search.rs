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

/// InnoDB's minimum indexed word length (`innodb_ft_min_token_size`).
const MIN_WORD_CHARS: usize = 3;
/// InnoDB's maximum indexed word length (`innodb_ft_max_token_size`).
const MAX_WORD_CHARS: usize = 84;

/// The words a query searches for; the last one is a prefix. Empty: the
/// query names no word either engine can find, and matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Words(Vec<String>);

impl Words {
    pub fn of(query: &str) -> Words {
        let mut words: Vec<&str> =
            query.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
        let last = words.pop();
        words.retain(|w| (MIN_WORD_CHARS..=MAX_WORD_CHARS).contains(&w.chars().count()));
        words.extend(last.filter(|w| w.chars().count() <= MAX_WORD_CHARS));
        Words(words.into_iter().map(str::to_owned).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// For `MATCH (name, description) AGAINST (? IN BOOLEAN MODE)`:
    /// `+cast +iron +te*`, and `+tea* tea` when the last word could be a
    /// whole indexed word: InnoDB gives every match of a prefix the same
    /// relevance, so the optional whole word (which selects nothing more)
    /// ranks the products that have it, more the more often, as FTS5's
    /// bm25 ranks prefix matches by how often they occur.
    pub fn mysql(&self) -> String {
        let mut terms = self.terms(|word| format!("+{word}"), |word| format!("+{word}*"));
        if let Some(last) = self.0.last().filter(|w| w.chars().count() >= MIN_WORD_CHARS) {
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
        let Some((last, rest)) = self.0.split_last() else { return String::new() };
        rest.iter().map(|w| word(w)).chain([prefix(last)]).collect::<Vec<_>>().join(" ")
    }
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
}
