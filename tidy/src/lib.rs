//! A small source scanner for the house rules (`tests/tidy.rs`): it blanks
//! comments and the insides of string and char literals, so brace counting
//! and pattern searches see only code, and finds every `fn` with the lines
//! it spans. Heuristic, not a parser: good enough for rustfmt-formatted code
//! and checked by its own tests.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// A function found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// First line (1-based), the `fn` line.
    pub start: usize,
    /// Last line (1-based), its closing brace.
    pub end: usize,
    /// Whether it is inside a `#[cfg(test)]` module.
    pub in_test: bool,
}

impl Function {
    /// Lines spanned, signature and closing brace included.
    pub fn lines(&self) -> usize {
        self.end + 1 - self.start
    }
}

/// The code of each line: comments removed and string/char literal
/// contents blanked (the quotes stay).
pub fn code_lines(src: &str) -> Vec<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        Code,
        Block(u32),
        Str,
        RawStr(usize),
    }
    let mut st = St::Code;
    let mut out = Vec::new();
    for line in src.lines() {
        let c: Vec<char> = line.chars().collect();
        let mut o = String::with_capacity(c.len());
        let mut i = 0;
        while i < c.len() {
            match st {
                St::Block(d) => {
                    if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        st = if d == 1 { St::Code } else { St::Block(d - 1) };
                        i += 2;
                    } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        st = St::Block(d + 1);
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                St::Str => {
                    if c[i] == '\\' {
                        i += 2;
                    } else if c[i] == '"' {
                        o.push('"');
                        st = St::Code;
                        i += 1;
                    } else {
                        i += 1;
                    }
                }
                St::RawStr(h) => {
                    if c[i] == '"' && c[i + 1..].iter().take(h).filter(|&&x| x == '#').count() == h
                    {
                        o.push('"');
                        st = St::Code;
                        i += 1 + h;
                    } else {
                        i += 1;
                    }
                }
                St::Code => {
                    let ch = c[i];
                    if ch == '/' && c.get(i + 1) == Some(&'/') {
                        break;
                    } else if ch == '/' && c.get(i + 1) == Some(&'*') {
                        st = St::Block(1);
                        i += 2;
                    } else if ch == '"' {
                        o.push('"');
                        st = St::Str;
                        i += 1;
                    } else if ch == 'r'
                        && (c.get(i + 1) == Some(&'"') || c.get(i + 1) == Some(&'#'))
                        && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
                    {
                        let mut j = i + 1;
                        let mut h = 0;
                        while c.get(j) == Some(&'#') {
                            h += 1;
                            j += 1;
                        }
                        if c.get(j) == Some(&'"') {
                            o.push('"');
                            st = St::RawStr(h);
                            i = j + 1;
                        } else {
                            o.push(ch);
                            i += 1;
                        }
                    } else if ch == 'b' && c.get(i + 1) == Some(&'\'') {
                        o.push('b');
                        i += 1;
                    } else if ch == '\'' {
                        // A char literal ('x', '\n', '\u{..}') or a lifetime.
                        if c.get(i + 1) == Some(&'\\') {
                            let mut j = i + 2;
                            while j < c.len() && c[j] != '\'' {
                                j += 1;
                            }
                            o.push_str("' '");
                            i = j + 1;
                        } else if c.get(i + 2) == Some(&'\'') {
                            o.push_str("' '");
                            i += 3;
                        } else {
                            o.push(ch);
                            i += 1;
                        }
                    } else {
                        o.push(ch);
                        i += 1;
                    }
                }
            }
        }
        out.push(o);
    }
    out
}

/// The name of the function a code line declares, if it does.
fn fn_name(code: &str) -> Option<String> {
    let t = code.trim_start();
    let mut words = t.split_whitespace().peekable();
    while let Some(w) = words.next() {
        match w {
            "pub" | "const" | "async" | "unsafe" | "extern" | "default" => continue,
            _ if w.starts_with("pub(") => continue,
            _ if w.starts_with('"') => continue,
            "fn" => {
                let n = words.next()?;
                let name: String = n
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return (!name.is_empty()).then_some(name);
            }
            _ => return None,
        }
    }
    None
}

/// Every function with a body in the code lines.
pub fn functions(code: &[String]) -> Vec<Function> {
    let mut out = Vec::new();
    // Lines of `#[cfg(test)]` modules.
    let mut test_line = vec![false; code.len()];
    let mut i = 0;
    while i < code.len() {
        if code[i].trim() == "#[cfg(test)]" {
            let mut j = i + 1;
            while j < code.len() && code[j].trim().starts_with("#[") {
                j += 1;
            }
            if j < code.len() && code[j].trim_start().starts_with("mod ") && code[j].contains('{') {
                if let Some(end) = block_end(code, j) {
                    for t in test_line.iter_mut().take(end + 1).skip(i) {
                        *t = true;
                    }
                    i = end + 1;
                    continue;
                }
            }
        }
        i += 1;
    }
    for (i, line) in code.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        // The body starts at the first `{` before a `;` ends a declaration.
        let mut j = i;
        let mut body = None;
        'find: while j < code.len() {
            let from = if j == i {
                line.find("fn ").unwrap_or(0)
            } else {
                0
            };
            for ch in code[j][from..].chars() {
                if ch == '{' {
                    body = Some(j);
                    break 'find;
                }
                if ch == ';' {
                    break 'find;
                }
            }
            j += 1;
        }
        let Some(b) = body else { continue };
        if let Some(end) = block_end(code, b) {
            out.push(Function {
                name,
                start: i + 1,
                end: end + 1,
                in_test: test_line[i],
            });
        }
    }
    out
}

/// The line where the brace block opened on line `from` closes.
fn block_end(code: &[String], from: usize) -> Option<usize> {
    let mut depth = 0i64;
    let mut opened = false;
    for (k, line) in code.iter().enumerate().skip(from) {
        for ch in line.chars() {
            match ch {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => {
                    depth -= 1;
                    if opened && depth == 0 {
                        return Some(k);
                    }
                }
                _ => {}
            }
        }
    }
    None
}

/// The workspace root (this crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, sorted, skipping `target` directories.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_strings_and_chars_are_blanked() {
        let src = "let a = \"{ // }\"; // {\nlet b = '{'; /* { */ let c = r#\"}\"#;\nfn f<'a>(x: &'a str) {}";
        let c = code_lines(src);
        assert_eq!(c[0], "let a = \"\"; ");
        assert_eq!(c[1], "let b = ' ';  let c = \"\";");
        assert!(c[2].contains("fn f<'a>(x: &'a str) {}"));
    }

    #[test]
    fn functions_and_their_spans_are_found() {
        let src = "pub fn one() {\n    let s = \"}\";\n}\n\nfn two(\n    a: u32,\n) -> u32 {\n    a\n}\ntrait T {\n    fn decl(&self);\n}\n#[cfg(test)]\nmod tests {\n    fn three() {}\n}\n";
        let f = functions(&code_lines(src));
        let names: Vec<_> = f
            .iter()
            .map(|f| (f.name.as_str(), f.start, f.end, f.in_test))
            .collect();
        assert_eq!(
            names,
            vec![
                ("one", 1, 3, false),
                ("two", 5, 9, false),
                ("three", 15, 15, true)
            ]
        );
    }
}
