//! Lexer and recursive-descent parser for filter expressions. Positions are 1-based character
//! (not byte) columns so messages point at the right place in unicode input.

use serde_json::Value;

/// Why an expression did not parse; `column` is the 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// The expression is empty or only whitespace.
    #[error("filter expression is empty")]
    Empty,
    /// A token that does not fit the grammar where it stands.
    #[error("invalid filter: expected {expected}, found {found} at column {column}")]
    UnexpectedToken {
        column: usize,
        expected: String,
        found: String,
    },
    /// A string literal without its closing quote.
    #[error("invalid filter: unterminated string starting at column {column}")]
    UnterminatedString { column: usize },
    /// A bad escape sequence inside a string literal.
    #[error("invalid filter: invalid escape sequence {escape} at column {column}")]
    InvalidEscape { column: usize, escape: String },
    /// A number that does not fit i64/f64.
    #[error("invalid filter: invalid number {text} at column {column}")]
    InvalidNumber { column: usize, text: String },
    /// A character that starts no token.
    #[error("invalid filter: unexpected character {ch:?} at column {column}")]
    UnexpectedChar { column: usize, ch: char },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    And,
    Or,
    Not,
    In,
    Like,
    Cmp(CmpOp),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("identifier {s}"),
            Tok::Int(i) => format!("number {i}"),
            Tok::Float(f) => format!("number {f}"),
            Tok::Str(s) => format!("string {s:?}"),
            Tok::Bool(b) => format!("{b}"),
            Tok::And => "'and'".into(),
            Tok::Or => "'or'".into(),
            Tok::Not => "'not'".into(),
            Tok::In => "'in'".into(),
            Tok::Like => "'like'".into(),
            Tok::Cmp(op) => format!("'{}'", op.as_str()),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::LBracket => "'['".into(),
            Tok::RBracket => "']'".into(),
            Tok::Comma => "','".into(),
            Tok::End => "end of expression".into(),
        }
    }
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// One step of a JSON path after the field name.
#[derive(Debug, Clone, PartialEq)]
pub enum PathStep {
    Key(String),
    Index(i64),
}

/// A value source inside a predicate.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Field { name: String, path: Vec<PathStep> },
    Lit(Value),
}

/// The parsed expression tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Operand, CmpOp, Operand),
    In {
        operand: Operand,
        list: Vec<Value>,
        negated: bool,
    },
    Like {
        operand: Operand,
        pattern: Vec<char>,
    },
    Truthy(Operand),
}

impl Expr {
    pub fn collect_fields(&self, out: &mut Vec<String>) {
        let mut push = |o: &Operand| {
            if let Operand::Field { name, .. } = o
                && !out.iter().any(|n| n == name)
            {
                out.push(name.clone());
            }
        };
        match self {
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.collect_fields(out);
                b.collect_fields(out);
            }
            Expr::Not(a) => a.collect_fields(out),
            Expr::Cmp(a, _, b) => {
                push(a);
                push(b);
            }
            Expr::In { operand, .. } | Expr::Like { operand, .. } | Expr::Truthy(operand) => {
                push(operand)
            }
        }
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    _src: &'a str,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            chars: src.chars().collect(),
            pos: 0,
            _src: src,
        }
    }

    fn peek_at(&self, off: usize) -> Option<char> {
        self.chars.get(self.pos + off).copied()
    }

    /// All tokens with their 1-based columns, ending with `End`.
    fn tokens(mut self) -> Result<Vec<(Tok, usize)>, FilterError> {
        let mut out = Vec::new();
        loop {
            while self.peek_at(0).is_some_and(char::is_whitespace) {
                self.pos += 1;
            }
            let col = self.pos + 1;
            let Some(c) = self.peek_at(0) else {
                out.push((Tok::End, col));
                return Ok(out);
            };
            let two = self.peek_at(1);
            let tok = match (c, two) {
                ('(', _) => self.one(Tok::LParen),
                (')', _) => self.one(Tok::RParen),
                ('[', _) => self.one(Tok::LBracket),
                (']', _) => self.one(Tok::RBracket),
                (',', _) => self.one(Tok::Comma),
                ('=', Some('=')) => self.two(Tok::Cmp(CmpOp::Eq)),
                ('!', Some('=')) => self.two(Tok::Cmp(CmpOp::Ne)),
                ('<', Some('=')) => self.two(Tok::Cmp(CmpOp::Le)),
                ('>', Some('=')) => self.two(Tok::Cmp(CmpOp::Ge)),
                ('<', _) => self.one(Tok::Cmp(CmpOp::Lt)),
                ('>', _) => self.one(Tok::Cmp(CmpOp::Gt)),
                ('!', _) => self.one(Tok::Not),
                ('&', Some('&')) => self.two(Tok::And),
                ('|', Some('|')) => self.two(Tok::Or),
                ('"' | '\'', _) => self.string(c)?,
                (c, _) if c.is_ascii_digit() => self.number()?,
                ('-' | '+' | '.', Some(d)) if d.is_ascii_digit() => self.number()?,
                ('-' | '+', Some('.')) if self.peek_at(2).is_some_and(|d| d.is_ascii_digit()) => {
                    self.number()?
                }
                (c, _) if is_ident_start(c) => self.word(),
                (ch, _) => return Err(FilterError::UnexpectedChar { column: col, ch }),
            };
            out.push((tok, col));
        }
    }

    fn one(&mut self, t: Tok) -> Tok {
        self.pos += 1;
        t
    }

    fn two(&mut self, t: Tok) -> Tok {
        self.pos += 2;
        t
    }

    fn word(&mut self) -> Tok {
        let start = self.pos;
        while self.peek_at(0).is_some_and(is_ident_char) {
            self.pos += 1;
        }
        let w: String = self.chars[start..self.pos].iter().collect();
        match w.to_ascii_lowercase().as_str() {
            "and" => Tok::And,
            "or" => Tok::Or,
            "not" => Tok::Not,
            "in" => Tok::In,
            "like" => Tok::Like,
            "true" => Tok::Bool(true),
            "false" => Tok::Bool(false),
            _ => Tok::Ident(w),
        }
    }

    fn number(&mut self) -> Result<Tok, FilterError> {
        let start = self.pos;
        let col = start + 1;
        if matches!(self.peek_at(0), Some('-' | '+')) {
            self.pos += 1;
        }
        let mut is_float = false;
        while let Some(c) = self.peek_at(0) {
            if c.is_ascii_digit() {
                self.pos += 1;
            } else if c == '.' && !is_float {
                is_float = true;
                self.pos += 1;
            } else if (c == 'e' || c == 'E')
                && (self.peek_at(1).is_some_and(|d| d.is_ascii_digit())
                    || (matches!(self.peek_at(1), Some('+' | '-'))
                        && self.peek_at(2).is_some_and(|d| d.is_ascii_digit())))
            {
                is_float = true;
                self.pos += 2;
            } else {
                break;
            }
        }
        // A number glued to letters (`12abc`) is not a number.
        if self.peek_at(0).is_some_and(is_ident_char) {
            while self.peek_at(0).is_some_and(is_ident_char) {
                self.pos += 1;
            }
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        let bad = || FilterError::InvalidNumber {
            column: col,
            text: text.clone(),
        };
        if is_float {
            let f: f64 = text.parse().map_err(|_| bad())?;
            if !f.is_finite() {
                return Err(bad());
            }
            Ok(Tok::Float(f))
        } else {
            text.parse::<i64>().map(Tok::Int).map_err(|_| bad())
        }
    }

    fn string(&mut self, quote: char) -> Result<Tok, FilterError> {
        let col = self.pos + 1;
        self.pos += 1;
        let mut s = String::new();
        loop {
            let Some(c) = self.peek_at(0) else {
                return Err(FilterError::UnterminatedString { column: col });
            };
            self.pos += 1;
            if c == quote {
                return Ok(Tok::Str(s));
            }
            if c != '\\' {
                s.push(c);
                continue;
            }
            let esc_col = self.pos;
            let Some(e) = self.peek_at(0) else {
                return Err(FilterError::UnterminatedString { column: col });
            };
            self.pos += 1;
            match e {
                '"' | '\'' | '/' => s.push(e),
                // `\\`, `\%` and `\_` stay escaped so `like` can tell a literal % from a
                // wildcard; `unescape_plain` resolves them everywhere else.
                '\\' | '%' | '_' => {
                    s.push('\\');
                    s.push(e);
                }
                'n' => s.push('\n'),
                't' => s.push('\t'),
                'r' => s.push('\r'),
                'u' => {
                    let hex: String = (0..4).filter_map(|i| self.peek_at(i)).collect();
                    let ch = (hex.len() == 4)
                        .then(|| u32::from_str_radix(&hex, 16).ok())
                        .flatten()
                        .and_then(char::from_u32)
                        .ok_or_else(|| FilterError::InvalidEscape {
                            column: esc_col,
                            escape: format!("\\u{hex}"),
                        })?;
                    self.pos += 4;
                    s.push(ch);
                }
                other => {
                    return Err(FilterError::InvalidEscape {
                        column: esc_col,
                        escape: format!("\\{other}"),
                    });
                }
            }
        }
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

pub fn parse(src: &str) -> Result<Expr, FilterError> {
    if src.trim().is_empty() {
        return Err(FilterError::Empty);
    }
    let toks = Lexer::new(src).tokens()?;
    let mut p = Parser { toks, pos: 0 };
    let e = p.or()?;
    p.expect(
        |t| matches!(t, Tok::End),
        "'and', 'or' or end of expression",
    )?;
    Ok(e)
}

/// Outside `like`, the kept escapes `\\`, `\%`, `\_` mean the plain characters.
fn unescape_plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos.min(self.toks.len() - 1)].0
    }

    fn col(&self) -> usize {
        self.toks[self.pos.min(self.toks.len() - 1)].1
    }

    fn bump(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err(&self, expected: &str) -> FilterError {
        FilterError::UnexpectedToken {
            column: self.col(),
            expected: expected.to_string(),
            found: self.peek().describe(),
        }
    }

    fn expect(&mut self, f: impl Fn(&Tok) -> bool, expected: &str) -> Result<Tok, FilterError> {
        if f(self.peek()) {
            Ok(self.bump())
        } else {
            Err(self.err(expected))
        }
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.and()?;
        while matches!(self.peek(), Tok::Or) {
            self.bump();
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.unary()?;
        while matches!(self.peek(), Tok::And) {
            self.bump();
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        if matches!(self.peek(), Tok::Not) {
            self.bump();
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if matches!(self.peek(), Tok::LParen) {
            self.bump();
            let e = self.or()?;
            self.expect(|t| matches!(t, Tok::RParen), "')'")?;
            return Ok(e);
        }
        self.predicate()
    }

    fn literal(&mut self) -> Result<Option<Value>, FilterError> {
        let v = match self.peek() {
            Tok::Int(i) => Value::from(*i),
            Tok::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Tok::Str(s) => Value::String(unescape_plain(s)),
            Tok::Bool(b) => Value::Bool(*b),
            _ => return Ok(None),
        };
        self.bump();
        Ok(Some(v))
    }

    fn operand(&mut self, expected: &str) -> Result<Operand, FilterError> {
        if let Some(v) = self.literal()? {
            return Ok(Operand::Lit(v));
        }
        let Tok::Ident(name) = self.peek().clone() else {
            return Err(self.err(expected));
        };
        self.bump();
        let mut path = Vec::new();
        while matches!(self.peek(), Tok::LBracket) {
            self.bump();
            let step = match self.bump_if_key() {
                Some(s) => s,
                None => return Err(self.err("a string key or integer index")),
            };
            path.push(step);
            self.expect(|t| matches!(t, Tok::RBracket), "']'")?;
        }
        Ok(Operand::Field { name, path })
    }

    fn bump_if_key(&mut self) -> Option<PathStep> {
        let step = match self.peek() {
            Tok::Str(s) => PathStep::Key(unescape_plain(s)),
            Tok::Int(i) => PathStep::Index(*i),
            _ => return None,
        };
        self.bump();
        Some(step)
    }

    fn predicate(&mut self) -> Result<Expr, FilterError> {
        const OPERAND: &str = "a field name, a literal, 'not' or '('";
        let left = self.operand(OPERAND)?;
        match self.peek().clone() {
            Tok::Not => {
                self.bump();
                if !matches!(self.peek(), Tok::In) {
                    return Err(self.err("'in' after 'not'"));
                }
                self.bump();
                let list = self.list()?;
                Ok(Expr::In {
                    operand: left,
                    list,
                    negated: true,
                })
            }
            Tok::In => {
                self.bump();
                let list = self.list()?;
                Ok(Expr::In {
                    operand: left,
                    list,
                    negated: false,
                })
            }
            Tok::Like => {
                self.bump();
                match self.bump() {
                    Tok::Str(s) => Ok(Expr::Like {
                        operand: left,
                        pattern: s.chars().collect(),
                    }),
                    _ => {
                        self.pos -= 1;
                        Err(self.err("a string pattern after 'like'"))
                    }
                }
            }
            Tok::Cmp(op) => {
                self.bump();
                let mid = self.operand("a field name or literal after the comparison")?;
                if let Tok::Cmp(op2) = self.peek().clone() {
                    let same_dir = matches!(
                        (op, op2),
                        (CmpOp::Lt | CmpOp::Le, CmpOp::Lt | CmpOp::Le)
                            | (CmpOp::Gt | CmpOp::Ge, CmpOp::Gt | CmpOp::Ge)
                    );
                    if !same_dir {
                        return Err(self.err(
                            "a chained range in one direction ('a < x <= b' or 'a > x >= b')",
                        ));
                    }
                    self.bump();
                    let right = self.operand("a field name or literal after the comparison")?;
                    return Ok(Expr::And(
                        Box::new(Expr::Cmp(left, op, mid.clone())),
                        Box::new(Expr::Cmp(mid, op2, right)),
                    ));
                }
                Ok(Expr::Cmp(left, op, mid))
            }
            _ => match &left {
                Operand::Field { .. } | Operand::Lit(Value::Bool(_)) => Ok(Expr::Truthy(left)),
                Operand::Lit(_) => Err(self.err("a comparison, 'in' or 'like'")),
            },
        }
    }

    fn list(&mut self) -> Result<Vec<Value>, FilterError> {
        self.expect(|t| matches!(t, Tok::LBracket), "'[' starting a list")?;
        let mut out = Vec::new();
        loop {
            if matches!(self.peek(), Tok::RBracket) {
                self.bump();
                return Ok(out);
            }
            match self.literal()? {
                Some(v) => out.push(v),
                None => return Err(self.err("a literal or ']'")),
            }
            match self.peek() {
                Tok::Comma => {
                    self.bump();
                }
                Tok::RBracket => {}
                _ => return Err(self.err("',' or ']'")),
            }
        }
    }
}
