//! `gpumem run SPEC.ron`: a run spec (as `--print-spec` writes it) run as its flags would run it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use gpumem_sim::spec::RunSpec;

#[derive(Args)]
#[command(
    after_help = "A spec is what `gpumem alloc|kv|models|colocate ... --print-spec`
writes: the run with every default resolved, as RON. Running it prints exactly what those flags
print (same text or JSON, same digest). Sweeps vary a spec field by field: a field is named
after its flag (--kv-blocks is kv_blocks; sizes add _bytes: --capacity is capacity_bytes) and
a value is spelled as the flag takes it. Every field must be given, except plot, step_log and
export_trace; an unknown field, a wrong type or an unknown value is refused with the file, line
and field. Relative paths resolve against the spec file's folder. A spec file is at most 1 MiB.

An example (gpumem kv --trace conversation_trace.jsonl --limit 200 --kv-blocks 2000 \\
  --bytes-per-block 4KiB --execute host --print-spec):

  Kv((
      trace: File(
          path: \"conversation_trace.jsonl\",
          format: \"mooncake\",
          limit: Some(200),
      ),
      seed: 0,
      gpu: \"h100\",
      model: \"llama-3.1-8b\",
      kv_blocks: 2000,
      gpu_memory_utilization: None,
      block_size: 16,
      max_num_seqs: 1024,
      max_num_batched_tokens: 8192,
      max_model_len: 31984,
      engine: \"vllm-0.33\",
      cost: \"roofline\",
      eviction: \"lru\",
      prefix_caching: true,
      scheduling_policy: \"fcfs\",
      pressure_thresholds: \"0.75,0.9\",
      cudagraph_sizes: \"vllm\",
      execute: Some((
          device: \"host\",
          bytes_per_block: 4096,
          inject: [],
      )),
  ))

gpu_memory_utilization: Some(0.9) instead says kv_blocks was sized from the GPU and model as
vLLM sizes it; the run checks that it still is. gpu and model take a built-in name or a whole
profile inline, (name: \"...\", ...) in the form of sim/profiles/*.ron."
)]
pub struct RunArgs {
    /// The run spec (RON).
    #[arg(value_name = "SPEC.ron")]
    spec: PathBuf,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,

    /// Check the spec and print it as gpumem reads it (paths made absolute), then exit.
    #[arg(long)]
    print_spec: bool,
}

pub fn run(args: RunArgs) -> Result<ExitCode, String> {
    let in_spec = |e: String| format!("{}: {e}", args.spec.display());
    match RunSpec::read_file(&args.spec)? {
        RunSpec::Alloc(spec) => {
            let checked = crate::alloc_cmd::check(&spec).map_err(in_spec)?;
            if args.print_spec {
                return crate::print_spec(RunSpec::Alloc(spec));
            }
            crate::alloc_cmd::run_spec(&spec, &checked, args.json)
        }
        RunSpec::Kv(spec) => {
            let checked = crate::kv_cmd::check(&spec).map_err(in_spec)?;
            if args.print_spec {
                return crate::print_spec(RunSpec::Kv(spec));
            }
            crate::kv_cmd::run_spec(&spec, &checked, args.json)
        }
        RunSpec::Models(spec) => {
            let checked = crate::models_cmd::check(&spec).map_err(in_spec)?;
            if args.print_spec {
                return crate::print_spec(RunSpec::Models(spec));
            }
            crate::models_cmd::run_spec(&spec, &checked, args.json)
        }
        RunSpec::Colocate(spec) => {
            let checked = crate::colocate_cmd::check(&spec).map_err(in_spec)?;
            if args.print_spec {
                return crate::print_spec(RunSpec::Colocate(spec));
            }
            crate::colocate_cmd::run_spec(&spec, &checked, args.json)
        }
    }
}
