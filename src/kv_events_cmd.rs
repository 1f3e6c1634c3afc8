//! `gpumem kv-events`: rebuilds, from a recorded vLLM KV-event stream, the cache index that a
//! KV-aware router would hold, and reports it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use gpumem_traces::kv_events::{import_file, KvEventsReport};

#[derive(Args)]
#[command(
    after_help = "Input: what vLLM 0.33 publishes on its KV-event socket, either the msgpack
payloads of its batches ([ts, [events...], dp_rank], events as maps with a \"type\" key, or the
arrays of vLLM before 0.24) concatenated as recorded, or JSON Lines with one event a line.
BlockStored, BlockRemoved and AllBlocksCleared rebuild the index; other event types are
counted and skipped. Hashes are kept as published (vLLM's default: the digest's last 8 bytes).

Example:
  gpumem kv-events tests/kv_events/default.msgpack --json"
)]
pub struct KvEventsArgs {
    /// A recorded KV-event stream (msgpack batches or JSON Lines; detected from the content).
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// Print one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
}

pub fn run(args: KvEventsArgs) -> Result<ExitCode, String> {
    let report = import_file(&args.file).map_err(|e| e.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serializes")
        );
    } else {
        print!("{}", render(&args.file, &report));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(file: &std::path::Path, r: &KvEventsReport) -> String {
    let mut out = format!(
        "stream        {} ({:?}, {} batches, {} events; events as {}, hashes as {})\n",
        file.display(),
        r.format,
        r.batches,
        r.events,
        r.event_encoding,
        r.hash_encoding
    );
    out.push_str(&format!(
        "stored        {} blocks in {} events ({} tokens; {} duplicate copies)\n",
        r.blocks_stored, r.block_stored_events, r.tokens_stored, r.duplicate_stores
    ));
    out.push_str(&format!(
        "removed       {} blocks in {} events ({} the index did not hold); {} cache clears\n",
        r.blocks_removed, r.block_removed_events, r.removed_unknown, r.all_blocks_cleared
    ));
    out.push_str(&format!(
        "index at end  {} blocks live ({} distinct hashes, {} tokens); at most {} live\n",
        r.blocks_live, r.hashes_live, r.tokens_live, r.max_blocks_live
    ));
    out.push_str(&format!(
        "longest chain {} blocks, {} prefix tokens\n",
        r.longest_chain_blocks, r.longest_chain_tokens
    ));
    for m in &r.media {
        out.push_str(&format!(
            "medium {:<6} {} stored, {} removed, {} live\n",
            m.medium.as_deref().unwrap_or("-"),
            m.blocks_stored,
            m.blocks_removed,
            m.blocks_live
        ));
    }
    if r.unknown_events > 0 || r.token_count_mismatches > 0 {
        out.push_str(&format!(
            "skipped       {} events of unknown type; {} stores whose token count is not blocks x block size\n",
            r.unknown_events, r.token_count_mismatches
        ));
    }
    out
}
