//! Runs the `vllm-0.33` personality over a conformance workload and config and writes the step
//! log, like vLLM's oracle (`../shared/conformance/vllm-oracle/oracle.py`):
//!
//!     cargo run --release -p gpumem-sim --example conformance_run -- W.jsonl C.json [OUT.jsonl]
//!
//! Exit status as the oracle's: 0 ok, 2 bad input, 3 stall. A summary goes to stderr.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 {
        eprintln!("usage: conformance_run WORKLOAD.jsonl CONFIG.json [STEPLOG.jsonl]");
        std::process::exit(2);
    }
    let t0 = Instant::now();
    let mut out: Box<dyn Write> = match args.get(2) {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).unwrap_or_else(|e| {
                eprintln!("conformance_run: error: {p}: {e}");
                std::process::exit(2)
            }),
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let res = gpumem_sim::serve::run_conformance_files(
        Path::new(&args[0]),
        Path::new(&args[1]),
        &mut out,
        &mut |w| eprintln!("conformance_run: {w}"),
    );
    if let Err(e) = out.flush() {
        eprintln!("conformance_run: error: {e}");
        std::process::exit(1);
    }
    match res {
        Ok(s) => eprintln!(
            "conformance_run: vllm-0.33: {} logged steps (last step {:?}), requests {}/{} finished, preemptions {}, admissions {}, hit tokens {}, scheduled tokens {}, wall {:.3} s",
            s.steps,
            s.last_step,
            s.requests_finished,
            s.requests,
            s.preemptions,
            s.admissions,
            s.admitted_hit_tokens,
            s.scheduled_tokens,
            t0.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("conformance_run: error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
