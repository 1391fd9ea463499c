//! Three-valued evaluation of a parsed expression against one row.

use super::FieldSource;
use super::parse::{CmpOp, Expr, Operand, PathStep};
use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;

/// Kleene truth value: `Unknown` comes from missing fields and type mismatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn from_bool(b: bool) -> Self {
        if b { Truth::True } else { Truth::False }
    }
    fn not(self) -> Self {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

pub fn eval(e: &Expr, row: &dyn FieldSource) -> Truth {
    match e {
        Expr::And(a, b) => match eval(a, row) {
            Truth::False => Truth::False,
            ta => match (ta, eval(b, row)) {
                (_, Truth::False) => Truth::False,
                (Truth::True, Truth::True) => Truth::True,
                _ => Truth::Unknown,
            },
        },
        Expr::Or(a, b) => match eval(a, row) {
            Truth::True => Truth::True,
            ta => match (ta, eval(b, row)) {
                (_, Truth::True) => Truth::True,
                (Truth::False, Truth::False) => Truth::False,
                _ => Truth::Unknown,
            },
        },
        Expr::Not(a) => eval(a, row).not(),
        Expr::Cmp(l, op, r) => match (resolve(l, row), resolve(r, row)) {
            (Some(a), Some(b)) => compare(&a, *op, &b),
            _ => Truth::Unknown,
        },
        Expr::In {
            operand,
            list,
            negated,
        } => {
            let Some(v) = resolve(operand, row) else {
                return Truth::Unknown;
            };
            let mut acc = Truth::False;
            for item in list {
                match compare(&v, CmpOp::Eq, item) {
                    Truth::True => {
                        acc = Truth::True;
                        break;
                    }
                    Truth::Unknown => acc = Truth::Unknown,
                    Truth::False => {}
                }
            }
            if *negated { acc.not() } else { acc }
        }
        Expr::Like { operand, pattern } => match resolve(operand, row).as_deref() {
            Some(Value::String(s)) => {
                let text: Vec<char> = s.chars().collect();
                Truth::from_bool(like(&text, pattern))
            }
            _ => Truth::Unknown,
        },
        Expr::Truthy(o) => match resolve(o, row).as_deref() {
            Some(Value::Bool(b)) => Truth::from_bool(*b),
            _ => Truth::Unknown,
        },
    }
}

fn resolve<'a>(o: &'a Operand, row: &'a dyn FieldSource) -> Option<Cow<'a, Value>> {
    match o {
        Operand::Lit(v) => Some(Cow::Borrowed(v)),
        Operand::Field { name, path } => {
            let mut cur = row.field(name)?;
            for step in path {
                cur = match cur {
                    Cow::Borrowed(v) => Cow::Borrowed(step_into(v, step)?),
                    Cow::Owned(v) => Cow::Owned(step_into(&v, step)?.clone()),
                };
            }
            Some(cur)
        }
    }
}

fn step_into<'v>(v: &'v Value, step: &PathStep) -> Option<&'v Value> {
    match (v, step) {
        (Value::Object(m), PathStep::Key(k)) => m.get(k),
        (Value::Array(a), PathStep::Index(i)) => usize::try_from(*i).ok().and_then(|i| a.get(i)),
        _ => None,
    }
}

/// Numbers compare exactly when both are integers, as f64 otherwise.
fn cmp_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

fn compare(a: &Value, op: CmpOp, b: &Value) -> Truth {
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => cmp_numbers(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => {
            return match op {
                CmpOp::Eq => Truth::from_bool(x == y),
                CmpOp::Ne => Truth::from_bool(x != y),
                CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => Truth::Unknown,
            };
        }
        (Value::Array(_), Value::Array(_)) | (Value::Object(_), Value::Object(_)) => {
            return match op {
                CmpOp::Eq => Truth::from_bool(a == b),
                CmpOp::Ne => Truth::from_bool(a != b),
                CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => Truth::Unknown,
            };
        }
        _ => None,
    };
    let Some(ord) = ord else {
        return Truth::Unknown;
    };
    Truth::from_bool(match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
    })
}

/// SQL LIKE: `%` any run, `_` one character, `\x` the character `x` itself.
/// Iterative with single backtrack point per `%`, O(len(text) * len(pattern)) worst case.
fn like(text: &[char], pat: &[char]) -> bool {
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() {
            match pat[p] {
                '%' => {
                    star = Some((p + 1, t));
                    p += 1;
                    continue;
                }
                '_' => {
                    t += 1;
                    p += 1;
                    continue;
                }
                '\\' if p + 1 < pat.len() && pat[p + 1] == text[t] => {
                    t += 1;
                    p += 2;
                    continue;
                }
                '\\' if p + 1 < pat.len() => {}
                c if c == text[t] => {
                    t += 1;
                    p += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    while p < pat.len() && pat[p] == '%' {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod like_tests {
    use super::like;

    fn m(t: &str, p: &str) -> bool {
        like(
            &t.chars().collect::<Vec<_>>(),
            &p.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn like_handles_prefix_suffix_infix_underscore_and_escapes() {
        assert!(m("apple", "app%"));
        assert!(!m("pineapple", "app%"));
        assert!(m("pineapple", "%apple"));
        assert!(m("pineapple", "%eap%"));
        assert!(m("abc", "a_c"));
        assert!(!m("abbc", "a_c"));
        assert!(m("", "%"));
        assert!(!m("", "_"));
        assert!(m("50%", "50\\%"));
        assert!(!m("500", "50\\%"));
        assert!(m("a%b", "%\\%%"));
        assert!(m("aaab", "%a%b"));
        assert!(m("日本語テキスト", "日本%"));
        assert!(m("日本語", "__語"));
    }
}
