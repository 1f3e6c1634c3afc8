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
        ("{\"id\":\"a\",\"arrival_us\":0,\"prompt\":[1],\"max_tokens\":1}\nnot json", "w:2: bad JSON"),
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
        ("\n{\"timestamp\": 0,", "m:2: bad JSON"),
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
    assert_eq!(err.to_string(), "e: the file is empty");
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
