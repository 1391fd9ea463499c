use super::*;
use serde_json::{Value, json};

fn row(v: Value) -> Value {
    v
}

fn m(expr: &str, r: &Value) -> bool {
    Filter::parse(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .matches(r)
}

fn err(expr: &str) -> FilterError {
    match Filter::parse(expr) {
        Ok(f) => panic!("{expr} parsed as {f:?}"),
        Err(e) => e,
    }
}

fn col(e: &FilterError) -> usize {
    match e {
        FilterError::Empty => 0,
        FilterError::UnexpectedToken { column, .. }
        | FilterError::UnterminatedString { column }
        | FilterError::InvalidEscape { column, .. }
        | FilterError::InvalidNumber { column, .. }
        | FilterError::UnexpectedChar { column, .. } => *column,
    }
}

#[test]
fn each_comparison_operator_compares_ints_floats_and_strings() {
    let r = row(json!({"a": 5, "f": 2.5, "s": "m"}));
    for (e, want) in [
        ("a == 5", true),
        ("a != 5", false),
        ("a < 6", true),
        ("a < 5", false),
        ("a <= 5", true),
        ("a > 4", true),
        ("a > 5", false),
        ("a >= 5", true),
        ("a == 5.0", true),
        ("f > 2", true),
        ("f < 2.5", false),
        ("f <= 2.5", true),
        ("s == \"m\"", true),
        ("s < 'n'", true),
        ("s >= 'z'", false),
        ("5 == a", true),
        ("6 > a", true),
        ("a == a", true),
        ("a < f", false),
    ] {
        assert_eq!(m(e, &r), want, "{e}");
    }
}

#[test]
fn chained_ranges_require_both_bounds() {
    let r = row(json!({"a": 3}));
    assert!(m("1 < a <= 5", &r));
    assert!(m("3 <= a < 4", &r));
    assert!(!m("3 < a < 10", &r));
    assert!(m("10 > a >= 3", &r));
    assert!(!m("10 > a > 3", &r));
    let e = err("1 < a > 5");
    assert_eq!(col(&e), 7, "{e}");
    assert!(e.to_string().contains("one direction"), "{e}");
}

#[test]
fn in_and_not_in_match_list_membership_with_numeric_coercion() {
    let r = row(json!({"a": 2, "s": "x"}));
    assert!(m("a in [1, 2, 3]", &r));
    assert!(m("a in [2.0]", &r));
    assert!(!m("a in [4, 5]", &r));
    assert!(m("a not in [4, 5]", &r));
    assert!(!m("a NOT IN [2]", &r));
    assert!(m("s in ['x', \"y\",]", &r));
    assert!(!m("a in []", &r));
    assert!(m("a not in []", &r));
}

#[test]
fn like_supports_prefix_suffix_and_infix_patterns() {
    let r = row(json!({"name": "pineapple"}));
    assert!(m("name like \"pine%\"", &r));
    assert!(m("name LIKE '%apple'", &r));
    assert!(m("name like \"%eap%\"", &r));
    assert!(!m("name like \"apple%\"", &r));
    assert!(m("name like 'pineapple'", &r));
    assert!(!m("name like 'pine'", &r));
}

#[test]
fn boolean_operators_are_case_insensitive_and_have_symbol_forms() {
    let r = row(json!({"a": 1, "b": 2}));
    assert!(m("a == 1 and b == 2", &r));
    assert!(m("a == 1 AND b == 2", &r));
    assert!(m("a == 1 && b == 2", &r));
    assert!(!m("a == 1 && b == 3", &r));
    assert!(m("a == 9 or b == 2", &r));
    assert!(m("a == 9 Or b == 2", &r));
    assert!(m("a == 9 || b == 2", &r));
    assert!(m("not a == 9", &r));
    assert!(m("NOT (a == 9)", &r));
    assert!(m("!(a == 9)", &r));
    assert!(!m("!!(a == 9)", &r));
}

#[test]
fn and_binds_tighter_than_or_and_not_tighter_than_and() {
    let r = row(json!({"a": 1, "b": 2, "c": 3}));
    // a==9 or (b==2 and c==3) → true; (a==9 or b==2) and c==9 would be false.
    assert!(m("a == 9 or b == 2 and c == 3", &r));
    assert!(!m("a == 9 or b == 2 and c == 9", &r));
    assert!(m("b == 2 and c == 9 or a == 1", &r));
    assert!(!m("(a == 9 or b == 2) and c == 9", &r));
    // not applies to the next predicate only.
    assert!(m("not a == 9 and b == 2", &r));
    assert!(!m("not (a == 1 and b == 2)", &r));
    assert!(m("not a == 1 or b == 2", &r));
    assert!(m("((a == 1))", &r));
}

#[test]
fn json_access_reads_nested_keys_and_array_indexes() {
    let r = row(json!({"meta": {"k": "v", "n": {"x": 7}, "arr": [10, 20]}}));
    assert!(m("meta[\"k\"] == \"v\"", &r));
    assert!(m("meta['n']['x'] >= 7", &r));
    assert!(m("meta[\"arr\"][1] == 20", &r));
    assert!(!m("meta[\"arr\"][5] == 20", &r));
    assert!(!m("meta[\"missing\"] == 1", &r));
    assert!(!m("meta[\"k\"][\"deeper\"] == 1", &r));
    let f = Filter::parse("meta[\"k\"] == 1 or a > 2 and meta['z'] < 1 or b in [1]").unwrap();
    assert_eq!(f.referenced_fields(), vec!["meta", "a", "b"]);
}

#[test]
fn literals_cover_ints_floats_strings_with_escapes_and_bools() {
    let r = row(json!({"i": -3, "f": 1.5e3, "s": "a\"b'c\\d\n", "b": true, "u": "é"}));
    assert!(m("i == -3", &r));
    assert!(m("i > -3.5", &r));
    assert!(m("f == 1500", &r));
    assert!(m("f == 1.5E3", &r));
    assert!(m(r#"s == "a\"b'c\\d\n""#, &r));
    assert!(m(r#"s == 'a"b\'c\\d\n'"#, &r));
    assert!(m("b == true", &r));
    assert!(m("b == True", &r));
    assert!(m("b != false", &r));
    assert!(m("b", &r));
    assert!(!m("not b", &r));
    assert!(m(r#"u == "\u00e9""#, &r));
}

#[test]
fn unicode_strings_and_identifiers_compare_by_code_point() {
    let r = row(json!({"城市": "北京", "emoji": "😀 ok"}));
    assert!(m("城市 == '北京'", &r));
    assert!(m("城市 in ['上海', '北京']", &r));
    assert!(m("emoji like '😀%'", &r));
    assert!(!m("城市 like '上%'", &r));
    let e = err("城市 == '北京");
    assert_eq!(col(&e), 7, "{e}");
}

#[test]
fn missing_fields_and_type_mismatches_never_match() {
    let r = row(json!({"a": "text", "n": null, "b": true, "x": 1}));
    for e in [
        "missing == 1",
        "missing != 1",
        "not missing == 1",
        "a > 1",
        "a == 1",
        "a != 1",
        "not (a == 1)",
        "n == 1",
        "n != 1",
        "b > false",
        "b == 1",
        "a in [1, 2]",
        "a not in [1, 2]",
        "x like 'a%'",
        "missing like 'a%'",
        "x",
        "missing in [1]",
        "missing not in [1]",
    ] {
        assert!(!m(e, &r), "{e} should not match");
    }
    // Unknown or true is true; unknown and false is false; false or unknown stays unknown.
    assert!(m("missing == 1 or x == 1", &r));
    assert!(!m("missing == 1 and x == 1", &r));
    assert!(m("not (missing == 1 and x == 2)", &r));
    assert!(!m("not (x == 2 or missing == 1)", &r));
}

#[test]
fn errors_name_the_column_and_what_was_expected() {
    let cases: [(&str, usize, &str); 14] = [
        ("a ==", 5, "expected a field name or literal"),
        ("a == 1 and", 11, "expected a field name, a literal"),
        ("(a == 1", 8, "expected ')'"),
        ("a == 1)", 7, "expected 'and', 'or' or end of expression"),
        ("a in 1", 6, "expected '[' starting a list"),
        ("a in [1 2]", 9, "expected ',' or ']'"),
        ("a in [b]", 7, "expected a literal or ']'"),
        ("a like 5", 8, "expected a string pattern"),
        ("a not 5", 7, "expected 'in' after 'not'"),
        ("a == 'abc", 6, "unterminated string"),
        ("a == 1 # b", 8, "unexpected character '#'"),
        ("a == 99999999999999999999", 6, "invalid number"),
        ("a == 'x\\q'", 8, "invalid escape sequence \\q"),
        ("meta[a] == 1", 6, "expected a string key or integer index"),
    ];
    for (expr, column, text) in cases {
        let e = err(expr);
        assert_eq!(col(&e), column, "{expr}: {e}");
        assert!(e.to_string().contains(text), "{expr}: {e}");
        assert!(
            e.to_string().contains(&format!("at column {column}")),
            "{expr}: {e}"
        );
    }
    assert_eq!(err("   "), FilterError::Empty);
    assert!(
        err("5")
            .to_string()
            .contains("a comparison, 'in' or 'like'")
    );
    assert!(err("a = 1").to_string().contains("'='"));
}

#[test]
fn referenced_fields_deduplicates_in_order_of_appearance() {
    let f = Filter::parse("b > 1 and (a < 2 or b == 3) and 1 < c < 2").unwrap();
    assert_eq!(f.referenced_fields(), vec!["b", "a", "c"]);
    assert!(
        Filter::parse("true")
            .unwrap()
            .referenced_fields()
            .is_empty()
    );
    assert!(Filter::parse("true").unwrap().matches(&json!({})));
    assert!(!Filter::parse("false").unwrap().matches(&json!({})));
}

#[test]
fn field_source_works_for_maps_and_owned_values() {
    struct Owned;
    impl FieldSource for Owned {
        fn field(&self, name: &str) -> Option<std::borrow::Cow<'_, Value>> {
            (name == "meta").then(|| std::borrow::Cow::Owned(json!({"k": [1, 2]})))
        }
    }
    let f = Filter::parse("meta['k'][0] == 1").unwrap();
    assert!(f.matches(&Owned));
    let map = json!({"meta": {"k": [1]}}).as_object().unwrap().clone();
    assert!(f.matches(&map));
}

#[test]
fn like_escapes_distinguish_literal_percent_from_wildcard() {
    let r = row(json!({"p": "50%", "q": "500", "s": "a%b"}));
    assert!(m(r#"p like "50\%""#, &r));
    assert!(!m(r#"q like "50\%""#, &r));
    assert!(m(r#"s == "a\%b""#, &r));
    assert!(m(r#"s like "a\%b""#, &r));
}
