//! The conformance step log (`../shared/conformance/README.md`, "Step log"): one line of
//! compact JSON per engine step that scheduled or preempted something, keys in the contract's
//! order, ids escaped as Python's `json.dumps(..., ensure_ascii=False)` escapes them.

use std::io::Write;

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

    /// The line for `rec`, newline included; `ids` names its requests.
    pub fn line(&mut self, rec: &StepRecord, ids: &dyn RequestIds) -> &[u8] {
        let l = &mut self.line;
        l.clear();
        let id = |l: &mut Vec<u8>, slot: usize| {
            serde_json::to_writer(&mut *l, ids.request_id(slot)).expect("a string serializes")
        };
        let _ = write!(l, "{{\"step\":{},\"scheduled\":[", rec.step);
        for (i, &(r, n)) in rec.scheduled.iter().enumerate() {
            l.extend_from_slice(if i > 0 { b",[" } else { b"[" });
            id(l, r);
            let _ = write!(l, ",{n}]");
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
            match rec.offload.and(rec.admitted_cpu.get(i)) {
                Some(cpu) => {
                    let _ = write!(l, ",{h},{cpu}]");
                }
                None => {
                    let _ = write!(l, ",{h}]");
                }
            }
        }
        l.extend_from_slice(b"],\"finished\":[");
        for (i, &r) in rec.finished.iter().enumerate() {
            if i > 0 {
                l.push(b',');
            }
            id(l, r);
        }
        let _ = write!(
            l,
            "],\"free_blocks\":{},\"stored\":{},\"removed\":{}",
            rec.free_blocks, rec.stored, rec.removed
        );
        if let Some(o) = rec.offload {
            let _ = write!(
                l,
                ",\"offload_stored\":{},\"offload_loaded\":{},\"cpu_stored\":{},\"cpu_evicted\":{}",
                o.offload_stored, o.offload_loaded, o.cpu_stored, o.cpu_evicted
            );
        }
        l.extend_from_slice(b"}\n");
        l
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
