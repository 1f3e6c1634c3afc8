//! The conformance step log (`../shared/conformance/README.md`, "Step log"): one line of
//! compact JSON per engine step that scheduled or preempted something, keys in the contract's
//! order, ids escaped as Python's `json.dumps(..., ensure_ascii=False)` escapes them.

use super::step::StepRecord;
use super::vllm::VllmEngine;

/// Answers the id of a request a [`StepRecord`] names (by its slot).
pub trait RequestIds {
    fn request_id(&self, slot: usize) -> &str;
}

impl RequestIds for VllmEngine<'_> {
    fn request_id(&self, slot: usize) -> &str {
        VllmEngine::request_id(self, slot)
    }
}

/// Writes step-log lines into one reused buffer.
#[derive(Debug, Default)]
pub struct StepLogWriter {
    line: Vec<u8>,
}

impl StepLogWriter {
    pub fn new() -> Self {
        StepLogWriter::default()
    }

    /// The line for `rec`, newline included; `ids` names its requests. Numbers and plain ids
    /// are written by hand: through `write!` and serde_json, formatting cost as much as the
    /// simulation on short runs.
    pub fn line(&mut self, rec: &StepRecord, ids: &dyn RequestIds) -> &[u8] {
        let l = &mut self.line;
        l.clear();
        let id = |l: &mut Vec<u8>, slot: usize| push_id(l, ids.request_id(slot));
        l.extend_from_slice(b"{\"step\":");
        push_u64(l, rec.step);
        l.extend_from_slice(b",\"scheduled\":[");
        for (i, &(r, n)) in rec.scheduled.iter().enumerate() {
            l.extend_from_slice(if i > 0 { b",[" } else { b"[" });
            id(l, r);
            l.push(b',');
            push_u64(l, n);
            l.push(b']');
        }
        l.extend_from_slice(b"],\"preempted\":[");
        for (i, &r) in rec.preempted.iter().enumerate() {
            if i > 0 {
                l.push(b',');
            }
            id(l, r);
        }
        l.extend_from_slice(b"],\"admitted\":[");
        for (i, &(r, h)) in rec.admitted.iter().enumerate() {
            l.extend_from_slice(if i > 0 { b",[" } else { b"[" });
            id(l, r);
            l.push(b',');
            push_u64(l, h);
            if let Some(cpu) = rec.offload.and(rec.admitted_cpu.get(i)) {
                l.push(b',');
                push_u64(l, *cpu);
            }
            l.push(b']');
        }
        l.extend_from_slice(b"],\"finished\":[");
        for (i, &r) in rec.finished.iter().enumerate() {
            if i > 0 {
                l.push(b',');
            }
            id(l, r);
        }
        l.extend_from_slice(b"],\"free_blocks\":");
        push_u64(l, u64::from(rec.free_blocks));
        l.extend_from_slice(b",\"stored\":");
        push_u64(l, rec.stored);
        l.extend_from_slice(b",\"removed\":");
        push_u64(l, rec.removed);
        if let Some(o) = rec.offload {
            for (key, n) in [
                (&b",\"offload_stored\":"[..], o.offload_stored),
                (b",\"offload_loaded\":", o.offload_loaded),
                (b",\"cpu_stored\":", o.cpu_stored),
                (b",\"cpu_evicted\":", o.cpu_evicted),
            ] {
                l.extend_from_slice(key);
                push_u64(l, n);
            }
        }
        l.extend_from_slice(b"}\n");
        l
    }
}

/// `n` in decimal.
#[inline]
fn push_u64(l: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    l.extend_from_slice(&digits[i..]);
}

/// `id` as a JSON string. One with nothing to escape (no quote, backslash or control
/// character: every id of the traces) is copied between quotes; any other goes through
/// serde_json, whose escapes are Python's with `ensure_ascii=False`.
#[inline]
fn push_id(l: &mut Vec<u8>, id: &str) {
    if id.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        l.push(b'"');
        l.extend_from_slice(id.as_bytes());
        l.push(b'"');
    } else {
        serde_json::to_writer(&mut *l, id).expect("a string serializes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ids;
    impl RequestIds for Ids {
        fn request_id(&self, slot: usize) -> &str {
            ["r0", "ü \"q\"", "r2"][slot]
        }
    }

    /// Written by hand or by serde_json, the same bytes: numbers at their edges, ids with
    /// and without escapes.
    #[test]
    fn hand_written_numbers_and_ids_are_serde_jsons() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut l = Vec::new();
            push_u64(&mut l, n);
            assert_eq!(l, serde_json::to_vec(&n).unwrap());
        }
        for id in [
            "",
            "r0",
            "ü \"q\"",
            "a\\b",
            "tab\there",
            "\u{1}",
            "\u{7f}",
            "\u{2028}",
            "日本",
        ] {
            let mut l = Vec::new();
            push_id(&mut l, id);
            assert_eq!(l, serde_json::to_vec(id).unwrap(), "{id:?}");
        }
    }

    #[test]
    fn lines_are_the_contracts_compact_json() {
        let rec = StepRecord {
            step: 12,
            scheduled: vec![(0, 512), (1, 1)],
            preempted: vec![2],
            admitted: vec![(1, 256)],
            finished: vec![0],
            free_blocks: 803,
            stored: 32,
            removed: 4,
            ..StepRecord::default()
        };
        let mut w = StepLogWriter::new();
        assert_eq!(
            std::str::from_utf8(w.line(&rec, &Ids)).unwrap(),
            "{\"step\":12,\"scheduled\":[[\"r0\",512],[\"ü \\\"q\\\"\",1]],\"preempted\":[\"r2\"],\"admitted\":[[\"ü \\\"q\\\"\",256]],\"finished\":[\"r0\"],\"free_blocks\":803,\"stored\":32,\"removed\":4}\n"
        );
    }
}
