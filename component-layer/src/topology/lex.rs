//! The DOT lexer: tokens with the line they start on.
//!
//! Follows the Graphviz language reference: identifiers (letters, digits, `_`, any non-ASCII
//! character, not starting with a digit), numerals, double-quoted strings (only `\"` is an escape;
//! a backslash-newline continues the line; `"a" + "b"` concatenates), HTML strings `<...>`,
//! comments `//`, `/* */`, and lines starting with `#`.

/// What kind of identifier a token was written as (keywords are only recognized unquoted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdKind {
    Plain,
    Numeral,
    Quoted,
    Html,
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok {
    Id(String, IdKind),
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Semi,
    Comma,
    Colon,
    Eq,
    /// `->`
    Directed,
    /// `--`
    Undirected,
}

/// A lexing error: the line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LexError {
    pub(crate) line: u32,
    pub(crate) message: String,
}

/// Splits `src` into tokens with their lines.
pub(crate) fn lex(src: &str) -> Result<Vec<(Tok, u32)>, LexError> {
    let mut out = Vec::with_capacity(src.len() / 4);
    let b = src.as_bytes();
    let mut i = 0;
    let mut line = 1u32;
    let mut at_line_start = true;
    let err = |line, message: String| Err(LexError { line, message });
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
            at_line_start = true;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' && at_line_start {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        at_line_start = false;
        let start_line = line;
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                loop {
                    if i + 1 >= b.len() {
                        return err(start_line, "unterminated /* comment".into());
                    }
                    if b[i] == b'*' && b[i + 1] == b'/' {
                        i += 2;
                        break;
                    }
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            b'{' | b'}' | b'[' | b']' | b';' | b',' | b':' | b'=' => {
                let t = match c {
                    b'{' => Tok::LBrace,
                    b'}' => Tok::RBrace,
                    b'[' => Tok::LBracket,
                    b']' => Tok::RBracket,
                    b';' => Tok::Semi,
                    b',' => Tok::Comma,
                    b':' => Tok::Colon,
                    _ => Tok::Eq,
                };
                out.push((t, line));
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'>') => {
                out.push((Tok::Directed, line));
                i += 2;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                out.push((Tok::Undirected, line));
                i += 2;
            }
            b'"' => {
                let (s, next, lines) = quoted(src, i).ok_or(LexError {
                    line: start_line,
                    message: "unterminated quoted string".into(),
                })?;
                line += lines;
                i = next;
                out.push((Tok::Id(s, IdKind::Quoted), start_line));
                // "a" + "b" concatenates: look for `+ "..."`.
                let mut j = i;
                let mut extra_lines = 0;
                loop {
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        if b[j] == b'\n' {
                            extra_lines += 1;
                        }
                        j += 1;
                    }
                    if j < b.len() && b[j] == b'+' {
                        let mut k = j + 1;
                        while k < b.len() && b[k].is_ascii_whitespace() {
                            if b[k] == b'\n' {
                                extra_lines += 1;
                            }
                            k += 1;
                        }
                        if k < b.len() && b[k] == b'"' {
                            let (s2, next2, l2) = quoted(src, k).ok_or(LexError {
                                line: line + extra_lines,
                                message: "unterminated quoted string".into(),
                            })?;
                            if let Some((Tok::Id(prev, _), _)) = out.last_mut() {
                                prev.push_str(&s2);
                            }
                            line += extra_lines + l2;
                            extra_lines = 0;
                            i = next2;
                            j = next2;
                            continue;
                        }
                    }
                    break;
                }
            }
            b'<' => {
                let mut depth = 0usize;
                let mut j = i;
                let mut lines = 0;
                loop {
                    let Some(&d) = b.get(j) else {
                        return err(start_line, "unterminated <HTML> string".into());
                    };
                    match d {
                        b'<' => depth += 1,
                        b'>' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        b'\n' => lines += 1,
                        _ => {}
                    }
                    j += 1;
                }
                out.push((Tok::Id(src[i + 1..j].to_owned(), IdKind::Html), start_line));
                line += lines;
                i = j + 1;
            }
            c if c.is_ascii_digit() || c == b'.' || c == b'-' => {
                let mut j = i + usize::from(c == b'-');
                let digits_start = j;
                let mut dot = false;
                while j < b.len() && (b[j].is_ascii_digit() || (b[j] == b'.' && !dot)) {
                    dot |= b[j] == b'.';
                    j += 1;
                }
                let body = &src[digits_start..j];
                if body.is_empty() || body == "." {
                    return err(line, format!("unexpected character '{}'", c as char));
                }
                if j < b.len() && is_id_byte(b[j]) {
                    return err(
                        line,
                        format!(
                            "'{}' is neither a number nor a name (a name cannot start with a digit; quote it)",
                            &src[i..end_of_word(b, j)]
                        ),
                    );
                }
                out.push((Tok::Id(src[i..j].to_owned(), IdKind::Numeral), line));
                i = j;
            }
            c if is_id_start(c) => {
                let j = end_of_word(b, i);
                out.push((Tok::Id(src[i..j].to_owned(), IdKind::Plain), line));
                i = j;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return err(line, format!("unexpected character {ch:?}"));
            }
        }
    }
    Ok(out)
}

fn is_id_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_id_byte(c: u8) -> bool {
    is_id_start(c) || c.is_ascii_digit()
}

fn end_of_word(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && is_id_byte(b[j]) {
        j += 1;
    }
    j
}

/// Reads the quoted string starting at `src[i] == '"'`: its text, the index after the closing
/// quote, and the newlines it spans. `None` when unterminated.
fn quoted(src: &str, i: usize) -> Option<(String, usize, u32)> {
    let b = src.as_bytes();
    let mut s = String::new();
    let mut j = i + 1;
    let mut lines = 0;
    let mut run = j;
    loop {
        match b.get(j)? {
            b'"' => {
                s.push_str(&src[run..j]);
                return Some((s, j + 1, lines));
            }
            b'\\' if b.get(j + 1) == Some(&b'"') => {
                s.push_str(&src[run..j]);
                s.push('"');
                j += 2;
                run = j;
            }
            b'\\' if b.get(j + 1) == Some(&b'\n') => {
                s.push_str(&src[run..j]);
                lines += 1;
                j += 2;
                run = j;
            }
            b'\n' => {
                lines += 1;
                j += 1;
            }
            _ => j += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Tok> {
        lex(s).expect("lexes").into_iter().map(|(t, _)| t).collect()
    }

    fn id(s: &str, k: IdKind) -> Tok {
        Tok::Id(s.into(), k)
    }

    #[test]
    fn tokens_comments_and_lines() {
        let src =
            "digraph g { // c\n  a:out -> \"b c\":in [x=1.5];\n /* multi\nline */ d -- e\n# pre\n}";
        let t = lex(src).expect("lexes");
        assert_eq!(t[0], (id("digraph", IdKind::Plain), 1));
        assert_eq!(t[3], (id("a", IdKind::Plain), 2));
        assert!(t.contains(&(id("b c", IdKind::Quoted), 2)));
        assert!(t.contains(&(id("1.5", IdKind::Numeral), 2)));
        assert!(t.contains(&(Tok::Undirected, 4)));
        assert_eq!(t.last(), Some(&(Tok::RBrace, 6)));
    }

    #[test]
    fn strings_escape_concatenate_and_html() {
        assert_eq!(toks(r#""a\"b" + "c""#), vec![id("a\"bc", IdKind::Quoted)]);
        assert_eq!(
            toks("\"x\" +\n \"y\" z"),
            vec![id("xy", IdKind::Quoted), id("z", IdKind::Plain)]
        );
        assert_eq!(toks("<<b>x</b>>"), vec![id("<b>x</b>", IdKind::Html)]);
        assert_eq!(
            toks("-3 .5 7."),
            vec![
                id("-3", IdKind::Numeral),
                id(".5", IdKind::Numeral),
                id("7.", IdKind::Numeral)
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(lex("a\n\"open").expect_err("unterminated").line, 2);
        assert_eq!(lex("a\n\n/* x").expect_err("unterminated").line, 3);
        let e = lex("a\n 9lives").expect_err("bad id");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("9lives"), "{}", e.message);
        assert!(lex("a @ b").expect_err("bad char").message.contains('@'));
        assert!(lex("a \u{0} b").is_err());
    }
}
