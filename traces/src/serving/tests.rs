use super::import::*;
use super::*;

#[test]
fn expansion_rule() {
    let p = Prompt::HashIds {
        hash_ids: vec![3, 1_000_000_000],
        input_length: 6,
        hash_block: 4,
    };
    let mut out = Vec::new();
    p.fill(0, 6, &mut out);
    let want: Vec<u32> = (0..6u64)
        .map(|j| {
            let h = [3i128, 1_000_000_000][(j / 4) as usize];
            ((h * 4 + (j % 4) as i128) % PROMPT_MOD) as u32
        })
        .collect();
    assert_eq!(out, want);
    out.clear();
    p.fill(3, 5, &mut out);
    assert_eq!(out, want[3..5]);
    assert_eq!(WorkloadRequest::generated_token(2, 5), 2_000_020_005);
}

#[test]
fn unique_prompts_expand_like_consecutive_hash_ids() {
    let u = Prompt::Unique {
        first_hash_id: 7,
        input_length: 1100,
    };
    let h = Prompt::HashIds {
        hash_ids: vec![7, 8, 9],
        input_length: 1100,
        hash_block: 512,
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    u.fill(0, 1100, &mut a);
    h.fill(0, 1100, &mut b);
    assert_eq!(a, b);
    a.clear();
    u.fill(500, 530, &mut a);
    assert_eq!(a, b[500..530]);
}

#[test]
fn errors_name_file_and_line() {
    let bad = [
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\nnot json", "w:2: column 2: bad JSON: expected ident"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":0}", "w:1: 'max_tokens'"),
        ("{\"id\":\"a\",\"arrival_us\":-1,\"prompt\":[1],\"max_tokens\":1}", "w:1: 'arrival_us'"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[],\"max_tokens\":1}", "w:1: empty prompt"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":\"x\",\"max_tokens\":1}", "w:1: 'prompt'"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1.5],\"max_tokens\":1}", "w:1: 'prompt'"),
        ("{\"id\":\"a\",\"arrival_us\":5,\"prompt\":[1],\"max_tokens\":1}\n{\"id\":\"b\",\"arrival_us\":4,\"prompt\":[1],\"max_tokens\":1}", "w:2: requests must be in arrival order"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\n{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}", "w:2: duplicate id"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"hash_ids\":[1],\"input_length\":513,\"max_tokens\":1}", "w:1: input_length 513 needs 2"),
        ("{\"id\":\"a\",\"arrival_us\":0,\"hash_ids\":[1],\"input_length\":\"3\",\"max_tokens\":1}", "w:1: 'input_length'"),
        ("[1,2]", "w:1: each line must be a JSON object"),
    ];
    for (text, want) in bad {
        let err = Workload::read(text.as_bytes(), "w").unwrap_err();
        assert!(err.to_string().starts_with(want), "{text:?}: got {err}");
    }
    let ok = Workload::read(
        "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1,2],\"max_tokens\":1,\"x\":1}\n\n".as_bytes(),
        "w",
    )
    .unwrap();
    assert_eq!(ok.requests.len(), 1);
    assert_eq!(ok.warnings.len(), 1);
    assert!(ok
        .validate(2)
        .unwrap_err()
        .to_string()
        .starts_with("w:1: prompt length 2 >= max_model_len 2"));
}

#[test]
fn limit_and_too_long() {
    let text = "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1,2,3],\"max_tokens\":1}\n\
                {\"id\":\"b\",\"arrival_us\":1,\"prompt\":[1],\"max_tokens\":1}\n\
                not even json";
    let mut w = Workload::read_limited(text.as_bytes(), "w", Some(2)).unwrap();
    assert_eq!(w.requests.len(), 2);
    let rejected = w.take_too_long(3);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].id, "a");
    assert_eq!(w.requests.len(), 1);
    assert_eq!(w.requests[0].id, "b");
}

#[test]
fn mooncake_reads_like_the_oracles_converter() {
    let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 0, \"hash_ids\": [0, 1]}\n\
                {\"timestamp\": 3000, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [0], \"session_id\": 4}\n";
    let w = mooncake(text.as_bytes(), "m", None).unwrap();
    assert!(w.warnings.is_empty());
    let conf = "{\"id\":\"r0\",\"arrival_us\":0,\"hash_ids\":[0,1],\"input_length\":600,\"max_tokens\":1}\n\
                {\"id\":\"r1\",\"arrival_us\":3000000,\"hash_ids\":[0],\"input_length\":10,\"max_tokens\":5}\n";
    assert_eq!(
        w.requests,
        Workload::read(conf.as_bytes(), "m").unwrap().requests
    );
    assert_eq!(
        mooncake(text.as_bytes(), "m", Some(1))
            .unwrap()
            .requests
            .len(),
        1
    );

    let bad = [
        (
            "{\"timestamp\": 0, \"input_length\": -5, \"output_length\": 1, \"hash_ids\": [0]}",
            "m:1: 'input_length' is negative (-5)",
        ),
        (
            "{\"timestamp\": 0, \"input_length\": \"5\", \"output_length\": 1, \"hash_ids\": [0]}",
            "m:1: 'input_length' must be a non-negative integer",
        ),
        (
            "{\"timestamp\": -1, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0]}",
            "m:1: 'timestamp' is negative",
        ),
        (
            "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [\"x\"]}",
            "m:1: hash id \"x\"",
        ),
        (
            "{\"timestamp\": 0, \"input_length\": 513, \"output_length\": 1, \"hash_ids\": [0]}",
            "m:1: input_length 513 needs 2",
        ),
        (
            "{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1, \"hash_ids\": []}",
            "m:1: empty prompt",
        ),
        (
            "{\"timestamp\": 0, \"input_length\": 5, \"hash_ids\": [0]}",
            "m:1: missing 'output_length'",
        ),
        (
            "\n{\"timestamp\": 0,",
            "m:2: column 16: bad JSON: EOF while parsing",
        ),
    ];
    for (text, want) in bad {
        let err = mooncake(text.as_bytes(), "m", None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{text:?}: got {err}");
    }
}

#[test]
fn qwen_bailian_uses_16_token_blocks_and_seconds() {
    let text = "{\"chat_id\": 10, \"parent_chat_id\": -1, \"timestamp\": 100.25, \"input_length\": 20, \"output_length\": 3, \"type\": \"text\", \"turn\": 1, \"hash_ids\": [5, 6]}\n\
                {\"chat_id\": 11, \"parent_chat_id\": 10, \"timestamp\": 100.5, \"input_length\": 40, \"output_length\": 3, \"type\": \"text\", \"turn\": 2, \"hash_ids\": [5, 6, 7]}\n";
    let w = qwen_bailian(text.as_bytes(), "q", None).unwrap();
    assert_eq!(w.requests[0].id, "10");
    assert_eq!(w.requests[0].arrival_us, 0);
    assert_eq!(w.requests[1].arrival_us, 250_000);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    w.requests[0].prompt.fill(0, 20, &mut a);
    w.requests[1].prompt.fill(0, 20, &mut b);
    assert_eq!(a, b);
    assert_eq!(a[16], ((6i128 * 16) % PROMPT_MOD) as u32);
    let err = qwen_bailian(
        "{\"chat_id\": 1.5, \"timestamp\": 1, \"input_length\": 2, \"output_length\": 1, \"hash_ids\": [1]}".as_bytes(),
        "q",
        None,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("q:1: 'chat_id'"), "{err}");
}

#[test]
fn azure_csv() {
    let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                2023-11-16 18:17:03.9799600,4808,10\n\
                2023-11-16 18:17:04.0319600,3180,8\r\n\
                2023-11-16 18:17:05.0000000,100,0";
    let w = azure(text.as_bytes(), "a", None).unwrap();
    let arrivals: Vec<u64> = w.requests.iter().map(|r| r.arrival_us).collect();
    assert_eq!(arrivals, [0, 52_000, 1_020_040]);
    assert_eq!(w.requests[2].max_tokens, 1);
    assert_eq!(w.requests[1].line, 3);
    // No prefix information: no two prompts share a token block.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    w.requests[0].prompt.fill(0, 512, &mut a);
    w.requests[1].prompt.fill(0, 512, &mut b);
    assert_ne!(a[..16], b[..16]);
    let bad = [
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,-4,10",
            "a:2: ContextTokens is negative (-4)",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4.5,10",
            "a:2: ContextTokens must be a non-negative integer",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,4,10",
            "a:2: TIMESTAMP \"yesterday\"",
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4",
            "a:2: expected 3 fields, got 2",
        ),
        (
            "TIMESTAMP,Tokens\n",
            "a:1: the header lacks the column 'ContextTokens'",
        ),
    ];
    for (text, want) in bad {
        let err = azure(text.as_bytes(), "a", None).unwrap_err().to_string();
        assert!(err.starts_with(want), "{text:?}: got {err}");
    }
}

#[test]
fn burstgpt_csv_skips_failed_requests() {
    let text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
                5,ChatGPT,472,18,490,Conversation log\n\
                45,ChatGPT,1087,0,1087,Conversation log\n\
                118.5,GPT-4,417,276,693,API log\n";
    let w = burstgpt(text.as_bytes(), "b", None).unwrap();
    assert_eq!(w.requests.len(), 2);
    assert_eq!(w.requests[1].id, "r2");
    assert_eq!(w.requests[1].arrival_us, 113_500_000);
    assert_eq!(w.warnings.len(), 1);
}

#[test]
fn timestamps_and_decimals() {
    assert_eq!(parse_decimal("3000", 3), Some(3_000_000));
    assert_eq!(parse_decimal("1.5", 6), Some(1_500_000));
    assert_eq!(parse_decimal("0.0000001", 6), Some(0));
    assert_eq!(parse_decimal("1e3", 0), Some(1000));
    assert_eq!(parse_decimal("1.25e-1", 3), Some(125));
    assert_eq!(parse_decimal("-1", 0), None);
    assert_eq!(parse_decimal("1e30", 0), None);
    assert_eq!(parse_decimal("", 0), None);
    let t = parse_datetime_ns("2023-11-16 18:17:03.9799600").unwrap();
    assert_eq!(t, 1_700_158_623_979_960_000);
    assert_eq!(
        parse_datetime_ns("2023-11-16T19:17:03.97996+01:00"),
        Some(t)
    );
    assert_eq!(parse_datetime_ns("1970-01-01 00:00:00"), Some(0));
    assert_eq!(parse_datetime_ns("2023-13-16 18:17:03"), None);
}

#[test]
fn formats_are_detected_by_content() {
    let p = std::path::Path::new("x");
    let cases = [
        (
            "{\"id\":\"a\",\"arrival_us\":0}",
            WorkloadFormat::Conformance,
        ),
        (
            "{\"timestamp\": 0, \"hash_ids\": [1]}",
            WorkloadFormat::Mooncake,
        ),
        (
            "{\"chat_id\": 1, \"timestamp\": 0, \"hash_ids\": [1]}",
            WorkloadFormat::QwenBailian,
        ),
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens",
            WorkloadFormat::Azure,
        ),
        (
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
            WorkloadFormat::BurstGpt,
        ),
    ];
    for (line, want) in cases {
        assert_eq!(WorkloadFormat::detect(p, 1, line).unwrap(), want, "{line}");
    }
    let err = WorkloadFormat::detect(p, 3, "a,b,c")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("x:3: cannot tell the workload format"),
        "{err}"
    );
    for f in WorkloadFormat::ALL {
        assert_eq!(WorkloadFormat::parse(f.name()), Some(f));
    }
}

proptest::proptest! {
    /// Tokens follow the contract's rule, `(hash_id * hash_block + offset) mod 1_000_000_007`
    /// computed in 128 bits, for any ids (negative, huge) and block sizes.
    #[test]
    fn fill_follows_the_expansion_rule(
        ids in proptest::collection::vec(proptest::prelude::any::<i64>(), 1..5),
        hb in proptest::prop_oneof![1u64..40, proptest::prelude::any::<u64>()],
        a in 0u64..200,
        b in 0u64..200,
    ) {
        let len = (ids.len() as u128 * hb as u128).min(200) as u64;
        let (start, end) = (a.min(b).min(len), a.max(b).min(len));
        let p = Prompt::HashIds { hash_ids: ids.clone(), input_length: len, hash_block: hb };
        let mut out = Vec::new();
        p.fill(start, end, &mut out);
        let want: Vec<u32> = (start..end)
            .map(|j| {
                let h = ids[(j / hb) as usize] as i128;
                (h * hb as i128 + (j % hb) as i128).rem_euclid(PROMPT_MOD) as u32
            })
            .collect();
        proptest::prop_assert_eq!(out, want);
    }
}

fn mooncake_line(t_ms: u64) -> String {
    format!(
        "{{\"timestamp\": {t_ms}, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [1]}}\n"
    )
}

#[test]
fn imported_requests_come_in_arrival_order_ties_in_file_order() {
    let text: String = [5, 3, 4, 3].into_iter().map(mooncake_line).collect();
    let stream = RequestStream::from_reader(text.as_bytes(), "m", None, None).unwrap();
    assert_eq!(stream.format(), WorkloadFormat::Mooncake);
    let got: Vec<(String, u64)> = stream
        .map(|r| r.map(|r| (r.id, r.arrival_us)))
        .collect::<Result<_, _>>()
        .unwrap();
    let want = [("r1", 3000), ("r3", 3000), ("r2", 4000), ("r0", 5000)];
    assert_eq!(got, want.map(|(id, t)| (id.to_string(), t)));
}

#[test]
fn a_request_further_out_of_order_than_the_window_is_refused() {
    let mut text: String = (1..=REORDER_WINDOW as u64 + 1).map(mooncake_line).collect();
    text.push_str(&mooncake_line(0));
    let line = REORDER_WINDOW + 2;
    let err =
        Workload::collect(RequestStream::from_reader(text.as_bytes(), "m", None, None).unwrap())
            .unwrap_err()
            .to_string();
    assert!(
        err.starts_with(&format!(
            "m:{line}: the request arrives before one {REORDER_WINDOW} or more requests earlier"
        )),
        "{err}"
    );
}

/// A reader that counts the lines taken from it.
struct CountingLines<'a> {
    lines: std::iter::Peekable<std::str::Lines<'a>>,
    taken: std::rc::Rc<std::cell::Cell<usize>>,
    pending: Vec<u8>,
}

impl std::io::Read for CountingLines<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            match self.lines.next() {
                Some(l) => {
                    self.taken.set(self.taken.get() + 1);
                    self.pending = format!("{l}\n").into_bytes();
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

#[test]
fn a_stream_reads_only_as_far_as_it_hands_out() {
    let text: String = (0..1000)
        .map(|i| {
            format!("{{\"id\":\"r{i}\",\"arrival_us\":{i},\"prompt\":[1,2],\"max_tokens\":1}}\n")
        })
        .collect();
    let taken = std::rc::Rc::new(std::cell::Cell::new(0));
    let input = CountingLines {
        lines: text.lines().peekable(),
        taken: taken.clone(),
        pending: Vec::new(),
    };
    let mut stream = RequestStream::from_reader(
        std::io::BufReader::with_capacity(16, input),
        "w",
        None,
        None,
    )
    .unwrap();
    for i in 0..10 {
        assert_eq!(stream.next().unwrap().unwrap().id, format!("r{i}"));
    }
    assert!(
        taken.get() <= 12,
        "{} lines read for 10 requests",
        taken.get()
    );
    assert_eq!(stream.count(), 990);
}

#[test]
fn a_line_longer_than_the_limit_is_refused_unread() {
    // An endless line: refused once the limit is crossed, never read to its end.
    let input = std::io::BufReader::new(std::io::Read::take(std::io::repeat(b'7'), u64::MAX));
    let err = RequestStream::from_reader(input, "w", Some(WorkloadFormat::Mooncake), None)
        .unwrap()
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("w:1: the line is longer than gpumem's limit of {MAX_LINE_BYTES} bytes")
    );
}

#[test]
fn detection_skips_blank_lines_and_an_empty_input_is_refused() {
    let text = format!("\n  \n{}", mooncake_line(1));
    let stream = RequestStream::from_reader(text.as_bytes(), "m", None, None).unwrap();
    assert_eq!(stream.format(), WorkloadFormat::Mooncake);
    let w = Workload::collect(stream).unwrap();
    assert_eq!((w.requests.len(), w.requests[0].line), (1, 3));
    let err = RequestStream::from_reader("\n\n".as_bytes(), "e", None, None)
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "e: the trace holds no request");
}

proptest::proptest! {
    /// Where a prompt says its tokens are consecutive, they are.
    #[test]
    fn consecutive_runs_are_what_fill_makes(
        ids in proptest::collection::vec(proptest::prelude::any::<i64>(), 1..4),
        hb in proptest::prop_oneof![1u64..40, 500u64..520],
        unique in proptest::prelude::any::<bool>(),
        start in 0u64..1500,
        len in 1u64..40,
    ) {
        let p = if unique {
            Prompt::Unique { first_hash_id: ids[0], input_length: 1500 }
        } else {
            let input_length = ids.len() as u64 * hb;
            Prompt::HashIds { hash_ids: ids, input_length, hash_block: hb }
        };
        if let Some(first) = p.consecutive_from(start, len) {
            let mut out = Vec::new();
            p.fill(start, start + len, &mut out);
            let want: Vec<u32> = (0..len as u32).map(|k| first + k).collect();
            proptest::prop_assert_eq!(out, want);
        }
        // A run covers exactly the blocks `consecutive_from` answers, with the same tokens.
        match p.consecutive_run(start) {
            Some((first, run)) => {
                proptest::prop_assert!(run >= 1);
                let mut out = Vec::new();
                p.fill(start, start + run, &mut out);
                let want: Vec<u32> = (0..run as u32).map(|k| first + k).collect();
                proptest::prop_assert_eq!(out, want);
                proptest::prop_assert_eq!(
                    p.consecutive_from(start, len),
                    (len <= run).then_some(first)
                );
            }
            None => proptest::prop_assert_eq!(p.consecutive_from(start, len), None),
        }
    }
}

#[test]
fn runs_across_a_hash_block_or_the_modulus_are_not_consecutive() {
    let p = Prompt::HashIds {
        hash_ids: vec![0, 7],
        input_length: 1024,
        hash_block: 512,
    };
    assert_eq!(p.consecutive_from(0, 16), Some(0));
    assert_eq!(p.consecutive_from(512, 16), Some(7 * 512));
    assert_eq!(
        p.consecutive_from(500, 16),
        None,
        "crosses into the next hash block"
    );
    assert_eq!(p.consecutive_from(1020, 16), None, "past the prompt");
    // Hash id -1: the block starts 512 below the modulus, so it wraps.
    let wraps = Prompt::HashIds {
        hash_ids: vec![-1],
        input_length: 512,
        hash_block: 512,
    };
    assert_eq!(
        wraps.consecutive_from(0, 16),
        Some((PROMPT_MOD - 512) as u32)
    );
    assert_eq!(
        wraps.consecutive_from(500, 16),
        None,
        "wraps at the modulus"
    );
    assert_eq!(Prompt::Tokens(vec![1, 2, 3]).consecutive_from(0, 2), None);
}

/// The first error `text` gives as `format` (None: detected), or None when it reads whole.
fn first_error(text: &[u8], format: Option<WorkloadFormat>) -> Option<String> {
    match RequestStream::from_reader(text, "t", format, None) {
        Err(e) => Some(e.to_string()),
        Ok(stream) => Workload::collect(stream).err().map(|e| e.to_string()),
    }
}

/// The decimal reader of before (a loop per unit of exponent), as the reference: right, but
/// slow for a large exponent.
fn decimal_by_loop(text: &str, scale: u32) -> Option<u64> {
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.strip_prefix('+').unwrap_or(e).parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits = format!("{whole}{frac}");
    let digits = digits.trim_start_matches('0');
    let shift = exp as i64 + scale as i64 - frac.len() as i64;
    let mut v: u128 = 0;
    let keep = if shift < 0 {
        digits.len().saturating_sub((-shift) as usize)
    } else {
        digits.len()
    };
    for b in digits[..keep].bytes() {
        v = v.checked_mul(10)?.checked_add((b - b'0') as u128)?;
        if v > u64::MAX as u128 {
            return None;
        }
    }
    for _ in 0..shift.max(0) {
        v = v.checked_mul(10)?;
        if v > u64::MAX as u128 {
            return None;
        }
    }
    u64::try_from(v).ok()
}

#[test]
fn absurd_exponents_are_refused_at_once() {
    for text in [
        "0e2147483647",
        "1e2147483647",
        "0e99999999999999999999",
        "5e-401",
    ] {
        let start = std::time::Instant::now();
        assert_eq!(
            decimal(text, 6),
            Err(DecimalError::ExponentTooLarge),
            "{text}"
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
    }
    assert_eq!(decimal("0e400", 6), Ok(0));
    assert_eq!(decimal("1e-400", 6), Ok(0));
    assert_eq!(decimal("1.5e+3", 0), Ok(1500));
    assert_eq!(decimal("18446744073709551615", 0), Ok(u64::MAX));
    assert_eq!(
        decimal("18446744073709551616", 0),
        Err(DecimalError::TooLarge)
    );
    assert_eq!(decimal("1.8446744073709551615e19", 0), Ok(u64::MAX));
    assert_eq!(decimal("e5", 0), Err(DecimalError::NotANumber));
    assert_eq!(decimal("1e", 0), Err(DecimalError::NotANumber));
    assert_eq!(decimal("1e+-5", 0), Err(DecimalError::NotANumber));

    // Ten BurstGPT rows of such timestamps once took 37 s; each is refused with its line.
    let rows: String = (0..10)
        .map(|_| "0e2147483647,ChatGPT,472,18,490,Conversation log\n")
        .collect();
    let text =
        format!("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n{rows}");
    let start = std::time::Instant::now();
    let err = burstgpt(text.as_bytes(), "b", None)
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < std::time::Duration::from_millis(500));
    assert_eq!(
        err,
        "b:2: Timestamp \"0e2147483647\" has an exponent beyond ±400 (gpumem's limit, MAX_DECIMAL_EXPONENT)"
    );
}

proptest::proptest! {
    /// Reading a decimal takes the same time whatever its exponent (none takes 10 ms, where
    /// a loop per unit of exponent takes seconds), and gives the loop's answer wherever the
    /// exponent is within the limit.
    #[test]
    fn decimal_time_does_not_depend_on_the_exponent(
        whole in "[0-9]{0,22}",
        frac in proptest::option::of("[0-9]{0,22}"),
        exponent in proptest::prop_oneof![
            -450i64..450,
            proptest::strategy::Strategy::prop_map(proptest::prelude::any::<i32>(), i64::from),
            proptest::prelude::any::<i64>(),
        ],
        scale in 0u32..10,
    ) {
        let mantissa = match &frac {
            Some(f) => format!("{whole}.{f}"),
            None => whole.clone(),
        };
        let text = format!("{mantissa}e{exponent}");
        let start = std::time::Instant::now();
        let got = decimal(&text, scale);
        proptest::prop_assert!(
            start.elapsed() < std::time::Duration::from_millis(10),
            "{} took {:?}", text, start.elapsed()
        );
        if mantissa.is_empty() || mantissa == "." {
            proptest::prop_assert_eq!(got, Err(DecimalError::NotANumber));
        } else if exponent.unsigned_abs() > MAX_DECIMAL_EXPONENT as u64 {
            proptest::prop_assert_eq!(got, Err(DecimalError::ExponentTooLarge));
        } else {
            proptest::prop_assert_eq!(got.ok(), decimal_by_loop(&text, scale));
        }
    }
}

#[test]
fn input_is_echoed_escaped_and_cut() {
    // A header that retitles the terminal and turns it red, with a NUL.
    let hostile = "TIMESTAMP,\u{1b}]0;owned\u{7}\u{1b}[31m\0Tokens,GeneratedTokens\nx,1,2\n";
    let err = first_error(hostile.as_bytes(), Some(WorkloadFormat::Azure)).unwrap();
    assert!(err.starts_with("t:1: the header lacks the column 'ContextTokens' (header: TIMESTAMP,\\u{1b}]0;owned\\u{7}\\u{1b}[31m\\0Tokens"), "{err}");
    assert!(!err.chars().any(|c| c.is_control()), "{err:?}");
    // A 10 MB header: the error stays a line.
    let huge = format!("TIMESTAMP,{}\n", "x".repeat(10 << 20));
    let err = first_error(huge.as_bytes(), Some(WorkloadFormat::Azure)).unwrap();
    assert!(err.len() < 300, "{} bytes", err.len());
    assert!(
        err.ends_with(&format!("… ({} bytes))", huge.len() - 1)),
        "{err}"
    );
    // Values too.
    let row = format!(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,{},1\n",
        "\u{1b}[2J".repeat(1000)
    );
    let err = first_error(row.as_bytes(), None).unwrap();
    assert!(err.len() < 300 && !err.contains('\u{1b}'), "{err:?}");
    let moon = format!(
        "{{\"timestamp\": 0, \"input_length\": \"{}\", \"output_length\": 1, \"hash_ids\": [0]}}\n",
        "\\u001b".repeat(100_000)
    );
    let err = first_error(moon.as_bytes(), None).unwrap();
    assert!(err.len() < 300 && !err.contains('\u{1b}'), "{err:?}");
    let conf = "{\"id\":\"\\u0000\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\n".repeat(2);
    let err = first_error(conf.as_bytes(), None).unwrap();
    assert_eq!(err, "t:2: duplicate id \"\\0\"");
}

#[test]
fn unknown_fields_are_named_a_few_times_then_counted() {
    let keys: String = (0..200_000).map(|i| format!(", \"k{i}\": 0")).collect();
    let text = format!(
        "{{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0]{keys}}}\n\
         {{\"timestamp\": 1, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0], \"\\u001b[31m\": 1}}\n"
    );
    let w = mooncake(text.as_bytes(), "m", None).unwrap();
    assert_eq!(w.requests.len(), 2);
    assert_eq!(
        w.warnings.len(),
        9,
        "{:?}",
        &w.warnings[..9.min(w.warnings.len())]
    );
    assert_eq!(w.warnings[0], "ignoring unknown Mooncake field \"k0\"");
    assert_eq!(
        w.warnings[8],
        "ignoring 65536 or more other unknown Mooncake fields (not listed)"
    );
    // Few enough: each counted; a name that is a terminal escape is escaped.
    let text = format!(
        "{{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0]{}}}\n\
         {{\"timestamp\": 1, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0], \"\\u001b[31m\": 1}}\n",
        &keys[..keys.match_indices(',').nth(10).unwrap().0]
    );
    let w = mooncake(text.as_bytes(), "m", None).unwrap();
    assert_eq!(
        w.warnings[8..],
        ["ignoring 3 more unknown Mooncake fields (not listed)"]
    );
    let conf = "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1,\"\\u001b]0;x\\u0007\":1}\n";
    let w = Workload::read(conf.as_bytes(), "w").unwrap();
    assert_eq!(
        w.warnings,
        ["ignoring unknown workload field \"\\u{1b}]0;x\\u{7}\""]
    );
}

#[test]
fn formats_are_told_by_keys_whatever_the_values() {
    // No f64 holds 1e400 and no u64 holds 2^70: detection reads past them; the parser then
    // refuses what it reads, naming the line.
    let odd = "{\"timestamp\": 0, \"input_length\": 5, \"output_length\": 1, \"hash_ids\": [0], \"x\": 1e400}\n";
    let stream = RequestStream::from_reader(odd.as_bytes(), "m", None, None).unwrap();
    assert_eq!(stream.format(), WorkloadFormat::Mooncake);
    let err = Workload::collect(stream).unwrap_err().to_string();
    assert!(
        err.starts_with("m:1: column 83: bad JSON: number out of range"),
        "{err}"
    );
    // A first line with input_length at gpumem's limit (2^32) and past it: detected by the
    // keys, then checked by the parser, at its line.
    for (length, want) in [
        (
            1u64 << 32,
            "t:1: input_length 4294967296 needs 8388608 hash_ids of 512 tokens, got 1",
        ),
        (
            (1 << 32) + 1,
            "t:1: 'input_length' 4294967297 exceeds gpumem's limit of 4294967296",
        ),
    ] {
        let text = format!(
            "{{\"timestamp\": 1, \"input_length\": {length}, \"output_length\": 1, \"hash_ids\": [0]}}\n{}",
            mooncake_line(2)
        );
        assert_eq!(first_error(text.as_bytes(), None).as_deref(), Some(want));
    }
}

#[test]
fn a_file_for_another_subcommand_names_it() {
    let cases: [(&[u8], &str); 4] = [
        // Protocol 0 and protocol 4 pickles: allocation snapshots.
        (b"(dp0\nVsegments\np1\n(lp2\ns.", "allocation snapshot (a pickle), not a request trace: `gpumem alloc --trace` reads it"),
        (b"\x80\x04\x95\x10\x00", "allocation snapshot (a pickle), not a request trace: `gpumem alloc --trace` reads it"),
        // A vLLM KV-event batch: [ts, [events]].
        (b"\x92\xcb\x41\xd9\x00\x00\x00\x00\x00\x00\x90", "KV-event stream (msgpack), not a request trace: `gpumem kv-events` reads it"),
        (b"{\"t_ns\": 0, \"op\": \"alloc\", \"id\": 1, \"bytes\": 512}\n", "allocation trace (gpumem JSON Lines), not a request trace: `gpumem alloc --trace` reads it"),
    ];
    for (bytes, want) in cases {
        let err = first_error(bytes, None).unwrap();
        assert!(err.starts_with("t") && err.contains(want), "{err}");
    }
    // A named format: a protocol-2+ pickle is still told apart.
    let err = first_error(b"\x80\x04\x95", Some(WorkloadFormat::Mooncake)).unwrap();
    assert!(err.contains("`gpumem alloc --trace` reads it"), "{err}");
}

#[test]
fn a_trace_without_a_request_is_refused_in_every_format() {
    let formats = || WorkloadFormat::ALL.into_iter().map(Some).chain([None]);
    for text in ["", "\n \n", "\u{feff}\n"] {
        for format in formats() {
            assert_eq!(
                first_error(text.as_bytes(), format).as_deref(),
                Some("t: the trace holds no request"),
                "{text:?} as {format:?}"
            );
        }
    }
    for (header, format) in [
        (
            "TIMESTAMP,ContextTokens,GeneratedTokens\n",
            WorkloadFormat::Azure,
        ),
        (
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n",
            WorkloadFormat::BurstGpt,
        ),
    ] {
        for given in [Some(format), None] {
            assert_eq!(
                first_error(header.as_bytes(), given).as_deref(),
                Some("t: the trace holds no request"),
                "{header:?} as {given:?}"
            );
        }
    }
    let failed_only = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
                       5,ChatGPT,472,0,472,Conversation log\n";
    assert_eq!(
        first_error(failed_only.as_bytes(), None).as_deref(),
        Some("t: the trace holds no request: its 1 rows are all failed requests (zero request or response tokens)")
    );
    // --limit 0 asks for none: not a refusal.
    let w = mooncake(mooncake_line(0).as_bytes(), "m", Some(0)).unwrap();
    assert!(w.requests.is_empty());
}

#[test]
fn csv_fields_follow_the_csv_rules_one_record_a_line() {
    // Quoted names and fields, a quoted comma, a doubled quote, spaces around fields.
    let text = "\"Timestamp\",Model,\"Request tokens\",Response tokens,Total tokens,Log Type\n\
                5,\"Chat,\"\"GPT\"\"\", 472 ,18,490,Conversation log\n\
                6.5,GPT-4,\"417\",276,693,API log\n";
    let w = burstgpt(text.as_bytes(), "b", None).unwrap();
    assert_eq!(w.requests.len(), 2);
    assert_eq!(w.requests[1].arrival_us, 1_500_000);
    assert_eq!(w.requests[1].prompt.len(), 417);
    // A line break inside quotes: refused where the record starts, so no line number lies.
    let split = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n\
                 5,ChatGPT,472,18,490,Conversation log\n\
                 6,\"Chat\nGPT\",472,18,490,API log\n\
                 7,ChatGPT,472,18,490,API log\n";
    assert_eq!(
        first_error(split.as_bytes(), None).as_deref(),
        Some("t:3: a quoted field is not closed on its line (gpumem reads one CSV record a line)")
    );
    // Too many fields: refused before the record is built.
    let wide = format!(
        "TIMESTAMP,ContextTokens,GeneratedTokens{}\n",
        ",x".repeat(MAX_CSV_FIELDS)
    );
    assert_eq!(
        first_error(wide.as_bytes(), Some(WorkloadFormat::Azure)).as_deref(),
        Some("t:1: more than 64 fields in a record (gpumem's limit, MAX_CSV_FIELDS)")
    );
    let narrow = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,1,2,3\n";
    assert_eq!(
        first_error(narrow.as_bytes(), None).as_deref(),
        Some("t:2: expected 3 fields, got 4")
    );
}

#[test]
fn every_format_reads_past_a_byte_order_mark() {
    let samples = [
        (
            WorkloadFormat::Conformance,
            "{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1,2],\"max_tokens\":1}\n".to_string(),
        ),
        (WorkloadFormat::Mooncake, mooncake_line(3)),
        (
            WorkloadFormat::QwenBailian,
            "{\"chat_id\": 1, \"parent_chat_id\": -1, \"timestamp\": 1.5, \"input_length\": 20, \"output_length\": 3, \"hash_ids\": [5, 6]}\n".to_string(),
        ),
        (
            WorkloadFormat::Azure,
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,4,10\n".to_string(),
        ),
        (
            WorkloadFormat::BurstGpt,
            "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,ChatGPT,472,18,490,Conversation log\n".to_string(),
        ),
    ];
    for (format, text) in samples {
        let plain = Workload::collect(
            RequestStream::from_reader(text.as_bytes(), "t", Some(format), None).unwrap(),
        )
        .unwrap();
        let with_bom = format!("\u{feff}{text}");
        for given in [Some(format), None] {
            let stream = RequestStream::from_reader(with_bom.as_bytes(), "t", given, None).unwrap();
            assert_eq!(stream.format(), format);
            let w = Workload::collect(stream).unwrap();
            assert_eq!(w.requests, plain.requests, "{format:?}");
            assert!(w.warnings.is_empty(), "{:?}", w.warnings);
        }
    }
}

/// Every request's model, reading models or not.
fn models_of(text: &str, read: bool) -> Result<Vec<Option<String>>, String> {
    let mut s =
        RequestStream::from_reader(text.as_bytes(), "t", None, None).map_err(|e| e.to_string())?;
    if read {
        assert!(s.read_models(), "{:?} carries model names", s.format());
    }
    s.map(|r| r.map(|r| r.model).map_err(|e| e.to_string()))
        .collect()
}

#[test]
fn model_names_are_read_only_when_asked_and_bounded() {
    let conformance = "{\"id\": \"a\", \"arrival_us\": 0, \"prompt\": [1, 2], \"max_tokens\": 2, \"model\": \"m@ft\"}\n{\"id\": \"b\", \"arrival_us\": 1, \"prompt\": [1], \"max_tokens\": 2}\n";
    assert_eq!(
        models_of(conformance, true).unwrap(),
        [Some("m@ft".to_string()), None]
    );
    assert_eq!(models_of(conformance, false).unwrap(), [None, None]);
    let mooncake = "{\"timestamp\": 0, \"input_length\": 3, \"output_length\": 1, \"hash_ids\": [1], \"model\": \"x\"}\n";
    assert_eq!(models_of(mooncake, true).unwrap(), [Some("x".to_string())]);
    let burst = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n1,GPT-4,5,0,5,c\n2,ChatGPT,5,3,8,c\n";
    assert_eq!(
        models_of(burst, true).unwrap(),
        [Some("ChatGPT".to_string())]
    );
    assert_eq!(models_of(burst, false).unwrap(), [None]);

    // At most MAX_MODEL_NAME_BYTES, named in the error with the line; ignored unread when not
    // asked for (`gpumem kv`).
    let long = "é".repeat(MAX_MODEL_NAME_BYTES / 2 + 1);
    let line = format!("{{\"id\": \"a\", \"arrival_us\": 0, \"prompt\": [1], \"max_tokens\": 2, \"model\": \"{long}\"}}\n");
    let e = models_of(&line, true).unwrap_err();
    assert!(
        e.starts_with("t:1:") && e.contains("MAX_MODEL_NAME_BYTES"),
        "{e}"
    );
    assert!(models_of(&line, false).is_ok());
    let fits = "é".repeat(MAX_MODEL_NAME_BYTES / 2);
    assert!(models_of(&line.replace(&long, &fits), true).is_ok());
    for bad in ["\"\"", "7", "null", "[\"m\"]"] {
        let line = conformance.lines().next().unwrap().replace("\"m@ft\"", bad);
        let e = models_of(&line, true).unwrap_err();
        assert!(e.starts_with("t:1:") && e.contains("'model'"), "{bad}: {e}");
        assert!(models_of(&line, false).is_ok(), "{bad}");
    }
    // A BurstGPT header without its Model column: kv reads it, models cannot.
    let no_model = "Timestamp,Request tokens,Response tokens\n1,5,3\n";
    assert!(models_of(no_model, false).is_ok());
    assert!(models_of(no_model, true).unwrap_err().contains("'Model'"));
    // Formats without model names say so.
    let azure = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,3,4\n";
    let mut s = RequestStream::from_reader(azure.as_bytes(), "t", None, None).unwrap();
    assert!(!s.read_models());
}

mod mooncake_lines {
    use super::super::stream::{LineParser, Record};
    use super::*;
    use proptest::prelude::*;

    /// A value of a Mooncake field: well typed most of the time, else any of the ways a line
    /// goes wrong (negative, too large, fractional, another type).
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => (0u64..5000).prop_map(|n| n.to_string()),
            1 => Just(u64::MAX.to_string()),
            1 => Just("-3".to_string()),
            1 => Just("1.5".to_string()),
            1 => Just("1e3".to_string()),
            1 => Just("null".to_string()),
            1 => Just("\"x\"".to_string()),
            1 => Just(format!("{}", super::MAX_PROMPT_TOKENS + 1)),
        ]
    }

    fn hash_ids() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => proptest::collection::vec(-3i64..40, 0..12)
                .prop_map(|v| format!("{v:?}")),
            1 => Just("[1, 2.5]".to_string()),
            1 => Just(format!("[{}]", u64::MAX)),
            1 => Just("7".to_string()),
        ]
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => value().prop_map(|v| format!("\"timestamp\": {v}")),
            3 => value().prop_map(|v| format!("\"input_length\": {v}")),
            3 => value().prop_map(|v| format!("\"output_length\": {v}")),
            3 => hash_ids().prop_map(|v| format!("\"hash_ids\": {v}")),
            1 => value().prop_map(|v| format!("\"session_id\": {v}")),
            1 => value().prop_map(|v| format!("\"delay\": {v}")),
            1 => value().prop_map(|v| format!("\"model\": {v}")),
            1 => value().prop_map(|v| format!("\"other\": {v}")),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        let whole = (
            value(),
            value(),
            value(),
            hash_ids(),
            proptest::collection::vec(field(), 0..3),
        )
            .prop_map(|(t, i, o, h, extra)| {
                let mut fields = vec![
                    format!("\"timestamp\": {t}"),
                    format!("\"input_length\": {i}"),
                    format!("\"output_length\": {o}"),
                    format!("\"hash_ids\": {h}"),
                ];
                fields.extend(extra);
                format!("{{{}}}", fields.join(", "))
            });
        let any =
            proptest::collection::vec(field(), 0..7).prop_map(|f| format!("{{{}}}", f.join(", ")));
        prop_oneof![4 => whole, 1 => any, 1 => Just("[1]".to_string())]
    }

    fn outcome(r: Result<Option<Record>, TraceError>, warnings: &[String]) -> String {
        match r {
            Ok(rec) => format!("{rec:?} {warnings:?}"),
            Err(e) => format!("error {e} {warnings:?}"),
        }
    }

    proptest! {
        /// The fast path for plain lines answers every line as the general path does: the
        /// same record, or the same error, and the same warnings.
        #[test]
        fn the_plain_path_agrees_with_the_general_one(lines in proptest::collection::vec(line(), 1..8)) {
            let (mut fast, mut general) = (Mooncake::new("t"), Mooncake::new("t"));
            let (mut w_fast, mut w_general) = (Vec::new(), Vec::new());
            for (i, text) in lines.iter().enumerate() {
                let n = i as u64 + 1;
                let a = outcome(fast.parse(n, text, &mut w_fast), &w_fast);
                let b = outcome(general.parse_general(n, text, &mut w_general), &w_general);
                prop_assert_eq!(a, b, "line {}", text);
            }
        }
    }

    #[test]
    fn a_plain_line_takes_the_plain_path() {
        let text =
            r#"{"timestamp": 27, "input_length": 700, "output_length": 3, "hash_ids": [4, 5]}"#;
        assert!(Mooncake::new("t").parse_plain(1, text).is_some());
        let unknown = text.replace("27,", "27, \"x\": 1,");
        assert!(Mooncake::new("t").parse_plain(1, &unknown).is_none());
    }
}
