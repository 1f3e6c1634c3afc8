use std::io::{self, BufReader, Read};

use super::*;

fn all_lines(input: impl BufRead, limits: Limits) -> Vec<Result<(u64, String), String>> {
    let mut reader = LineReader::new(input, "t.jsonl").with_limits(limits);
    let mut out = Vec::new();
    while let Some(line) = reader.next_line() {
        out.push(
            line.map(|l| (l.number, l.text.to_owned()))
                .map_err(|e| e.to_string()),
        );
    }
    out
}

fn ok(lines: &[(u64, &str)]) -> Vec<Result<(u64, String), String>> {
    lines.iter().map(|&(n, t)| Ok((n, t.to_owned()))).collect()
}

#[test]
fn numbers_lines_and_strips_endings() {
    let got = all_lines("a\r\n\n  \nlast\r".as_bytes(), Limits::default());
    assert_eq!(got, ok(&[(1, "a"), (2, ""), (3, "  "), (4, "last")]));
    assert_eq!(
        all_lines("a\n".as_bytes(), Limits::default()),
        ok(&[(1, "a")])
    );
    assert!(all_lines(io::empty(), Limits::default()).is_empty());
}

#[test]
fn invalid_utf8_names_file_line_and_byte_then_stops() {
    let got = all_lines(&b"ok\nab\xffc\nnever\n"[..], Limits::default());
    assert_eq!(
        got,
        vec![
            Ok((1, "ok".to_owned())),
            Err("t.jsonl:2: not valid UTF-8 (byte 3 of the line)".to_owned())
        ]
    );
}

/// A reader that serves its bytes a few at a time, as a pipe does, and counts what was taken.
struct Trickle<'a> {
    bytes: &'a [u8],
    taken: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(3).min(self.bytes.len() - self.taken);
        buf[..n].copy_from_slice(&self.bytes[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

#[test]
fn lines_split_across_reads_come_whole() {
    let input = Trickle {
        bytes: b"{\"a\": 1}\r\n{\"b\": 22}\n",
        taken: 0,
    };
    let got = all_lines(BufReader::with_capacity(4, input), Limits::default());
    assert_eq!(got, ok(&[(1, "{\"a\": 1}"), (2, "{\"b\": 22}")]));
}

#[test]
fn an_overlong_line_is_refused_before_it_is_read_whole() {
    let mut bytes = b"short\n".to_vec();
    bytes.extend(std::iter::repeat_n(b'x', 10_000));
    bytes.extend(b"\nafter\n");
    let mut input = BufReader::with_capacity(
        16,
        Trickle {
            bytes: &bytes,
            taken: 0,
        },
    );
    let limits = Limits {
        max_line_bytes: 100,
        ..Limits::default()
    };
    let got = all_lines(&mut input, limits);
    assert_eq!(
        got,
        vec![
            Ok((1, "short".to_owned())),
            Err("t.jsonl:2: the line is longer than gpumem's limit of 100 bytes".to_owned())
        ]
    );
    assert!(
        input.get_ref().taken < 200,
        "read {}",
        input.get_ref().taken
    );
}

#[test]
fn a_line_of_exactly_the_limit_is_accepted() {
    let limits = Limits {
        max_line_bytes: 3,
        ..Limits::default()
    };
    assert_eq!(
        all_lines("abc\nabc".as_bytes(), limits),
        ok(&[(1, "abc"), (2, "abc")])
    );
}

#[test]
fn endless_input_ends_at_the_input_limit() {
    let limits = Limits {
        max_input_bytes: 1000,
        ..Limits::default()
    };
    let got = all_lines(BufReader::new(io::repeat(b'\n')), limits);
    assert_eq!(got.len(), 1001);
    assert_eq!(
        got.last().unwrap(),
        &Err("t.jsonl:1001: the input is longer than gpumem's limit of 1000 bytes".to_owned())
    );
}

#[test]
fn read_errors_name_the_line() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("disk on fire"))
        }
    }
    let got = all_lines(BufReader::new(Broken), Limits::default());
    assert_eq!(
        got,
        vec![Err(
            "t.jsonl:1: cannot read the input: disk on fire".to_owned()
        )]
    );
}

#[test]
fn blank_and_comment_lines() {
    let line = |text| Line {
        number: 1,
        text,
        path: Path::new("f"),
    };
    assert!(line(" \t").is_blank());
    assert!(line("  # note").is_blank_or_comment());
    assert!(!line("{}").is_blank_or_comment());
    assert_eq!(line("{}").error("bad").to_string(), "f:1: bad");
}
