//! Milvus boolean filter expressions: parsing ([`Filter::parse`]) and evaluation against one row
//! ([`Filter::matches`]). Pure: no I/O, no storage types; callers adapt their rows through
//! [`FieldSource`] and turn per-row answers into a [`crate::bitset::Bitset`].
//!
//! Grammar (keywords case-insensitive):
//! ```text
//! expr       := or
//! or         := and (("or" | "||") and)*
//! and        := unary (("and" | "&&") unary)*
//! unary      := ("not" | "!") unary | primary
//! primary    := "(" expr ")" | predicate
//! predicate  := operand [not] in "[" literal ("," literal)* [","] "]"
//!             | operand like string
//!             | operand cmp operand [cmp operand]      (chained range, one direction)
//!             | operand                                (a bool field or literal)
//! operand    := field ("[" (string | int) "]")* | literal
//! literal    := int | float | string ('..' or "..", escapes) | true | false
//! ```
//!
//! Semantics: a missing field, a JSON path that does not resolve or a type mismatch makes that
//! predicate *unknown*; `and`/`or`/`not` follow three-valued (Kleene) logic and a row matches only
//! when the whole expression is *true*. So `not (a == 1)` does not match a row without `a`.

mod eval;
mod parse;

use std::borrow::Cow;

pub use parse::FilterError;

/// A row as the filter sees it: named fields with JSON values.
pub trait FieldSource {
    /// The value of top-level field `name`, or `None` when the row has no such field.
    fn field(&self, name: &str) -> Option<Cow<'_, serde_json::Value>>;
}

impl FieldSource for serde_json::Map<String, serde_json::Value> {
    fn field(&self, name: &str) -> Option<Cow<'_, serde_json::Value>> {
        self.get(name).map(Cow::Borrowed)
    }
}

impl FieldSource for serde_json::Value {
    fn field(&self, name: &str) -> Option<Cow<'_, serde_json::Value>> {
        self.as_object()
            .and_then(|m| m.get(name))
            .map(Cow::Borrowed)
    }
}

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    root: parse::Expr,
}

impl Filter {
    /// Parse a Milvus boolean expression.
    ///
    /// Errors: [`FilterError`] with the 1-based character column of the offending token and what
    /// was expected there.
    pub fn parse(expr: &str) -> Result<Filter, FilterError> {
        parse::parse(expr).map(|root| Filter { root })
    }

    /// Whether `row` satisfies the expression. Never panics: missing fields and type mismatches
    /// simply do not match.
    pub fn matches(&self, row: &dyn FieldSource) -> bool {
        eval::eval(&self.root, row) == eval::Truth::True
    }

    /// Top-level field names the expression reads (`meta` for `meta["k"]`), in order of first
    /// appearance, without duplicates.
    pub fn referenced_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.root.collect_fields(&mut out);
        out
    }
}

#[cfg(test)]
mod tests;
