//! `gpumem kv-events`: a recorded vLLM KV-event stream imported into the cache index a
//! KV-aware router would hold, and reported.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use gpumem_traces::kv_events::{detect_format, import_bytes_as, KvEventsReport, StreamFormat};

#[derive(Args)]
#[command(after_help = "Examples:
  gpumem kv-events events.msgpack                 what a router's index holds after the recording
  gpumem kv-events events.jsonl --json            one JSON object, for scripts
  oracle.py --workload w.jsonl --config c.json --out steps.jsonl --events-out ev.msgpack
  gpumem kv-events ev.msgpack                     record vLLM 0.33's events, then import them

Formats (detected from the first byte when --format is not given):
  msgpack  the payloads vLLM's ZMQ KV-event publisher sends, concatenated: each batch
           [ts, [event, ...], data_parallel_rank]; events as maps with a \"type\" key
           (vLLM >= 0.24) or arrays led by the type name (older)
  jsonl    one event a line: {\"type\": \"BlockStored\", \"block_hashes\": [...],
           \"parent_block_hash\": ..., \"token_ids\": [...], \"block_size\": 16, \"medium\": \"GPU\"},
           {\"type\": \"BlockRemoved\", \"block_hashes\": [...]}, {\"type\": \"AllBlocksCleared\"};
           optional \"ts\" and \"data_parallel_rank\"; blank lines and # comments skipped
Block hashes are integers (vLLM's default, the digest's last 8 bytes) or raw digests (msgpack
bytes; hex strings in JSON). Unknown fields are ignored; unknown event types are counted.

What the report means:
  blocks stored/removed  hashes in BlockStored / BlockRemoved events
  blocks live            physical blocks holding a hash at the end: the router's view of what
                         the engine could serve as a prefix hit (copies of one hash counted;
                         vLLM stores a hash twice when a block-aligned prompt is recomputed)
  hashes live            distinct (medium, KV-cache group, hash) entries at the end
  max blocks live        most blocks live at any point of the stream
  longest chain          the longest run of live blocks linked by parent hashes: the longest
                         prefix the index can match, in blocks and tokens
  duplicate stores       stored hashes the index already held (another copy)
  removed, not held      removals of hashes the index never saw (a recording that started late,
                         or removals after AllBlocksCleared)
  token-count mismatches BlockStored events whose token ids are not blocks x block_size
AllBlocksCleared (vLLM's reset_prefix_cache) empties the index on every medium.

Malformed input is an error naming the file and the byte offset (msgpack) or line (jsonl),
exit status 2.")]
pub struct KvEventsArgs {
    /// The recorded KV-event stream (msgpack batches or JSON Lines).
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// The stream's encoding; detected from its first byte when not given.
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<FormatArg>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// vLLM's ZMQ payloads, concatenated.
    Msgpack,
    /// One JSON event a line.
    Jsonl,
}

impl FormatArg {
    fn stream(self) -> StreamFormat {
        match self {
            FormatArg::Msgpack => StreamFormat::Msgpack,
            FormatArg::Jsonl => StreamFormat::Jsonl,
        }
    }
}

fn format_name(f: StreamFormat) -> &'static str {
    match f {
        StreamFormat::Msgpack => "msgpack",
        StreamFormat::Jsonl => "jsonl",
    }
}

pub fn run(args: KvEventsArgs) -> Result<ExitCode, String> {
    let path = &args.file;
    let bytes = gpumem_traces::kv_events::read_stream(path).map_err(|e| e.to_string())?;
    if bytes.is_empty() {
        return Err(format!("{}: the stream holds no event", path.display()));
    }
    let detected = detect_format(&bytes);
    let format = args.format.map_or(detected, FormatArg::stream);
    let (_, report) = import_bytes_as(path, &bytes, format).map_err(|e| {
        if format != detected {
            format!(
                "{e} (read as --format {}; the file looks like {}: leave --format out to detect it)",
                format_name(format),
                format_name(detected)
            )
        } else {
            e.to_string()
        }
    })?;
    if args.json {
        let mut value = serde_json::to_value(&report).expect("report serializes");
        value["file"] = path.display().to_string().into();
        crate::output::println(&serde_json::to_string(&value).expect("report serializes"))?;
    } else {
        crate::output::print(&render_text(&path.display().to_string(), &report))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn render_text(file: &str, r: &KvEventsReport) -> String {
    let mut out = format!(
        "kv-events  {file}\nstream     {}, {} {}, {} events (events as {}, {} hashes)\n",
        format_name(r.format),
        r.batches,
        match r.format {
            StreamFormat::Msgpack => "batches",
            StreamFormat::Jsonl => "lines",
        },
        r.events,
        match r.event_encoding {
            "map" => "maps",
            "array" => "arrays, vLLM < 0.24",
            other => other,
        },
        r.hash_encoding,
    );
    if let (Some(a), Some(b)) = (r.first_ts, r.last_ts) {
        out.push_str(&format!("time       ts {a:.3} .. {b:.3} s\n"));
    }
    if !r.data_parallel_ranks.is_empty() {
        let ranks: Vec<String> = r
            .data_parallel_ranks
            .iter()
            .map(|x| x.to_string())
            .collect();
        out.push_str(&format!("dp ranks   {}\n", ranks.join(", ")));
    }
    out.push('\n');
    out.push_str("event               events    blocks    tokens\n");
    out.push_str(&format!(
        "BlockStored       {:>8}  {:>8}  {:>8}\n",
        r.block_stored_events, r.blocks_stored, r.tokens_stored
    ));
    out.push_str(&format!(
        "BlockRemoved      {:>8}  {:>8}\n",
        r.block_removed_events, r.blocks_removed
    ));
    out.push_str(&format!("AllBlocksCleared  {:>8}\n", r.all_blocks_cleared));
    if r.unknown_events > 0 {
        out.push_str(&format!(
            "unknown type      {:>8}  (skipped)\n",
            r.unknown_events
        ));
    }
    out.push_str("\ncache index at the end of the stream\n");
    out.push_str(&format!(
        "  blocks live             {:>8}  ({} hashes, {} tokens)\n",
        r.blocks_live, r.hashes_live, r.tokens_live
    ));
    out.push_str(&format!(
        "  max blocks live         {:>8}\n",
        r.max_blocks_live
    ));
    out.push_str(&format!(
        "  longest chain           {:>8}  blocks, {} tokens\n",
        r.longest_chain_blocks, r.longest_chain_tokens
    ));
    out.push_str(&format!(
        "  duplicate stores        {:>8}\n",
        r.duplicate_stores
    ));
    out.push_str(&format!(
        "  removed, not held       {:>8}\n",
        r.removed_unknown
    ));
    out.push_str(&format!(
        "  token-count mismatches  {:>8}\n",
        r.token_count_mismatches
    ));
    if !r.media.is_empty() {
        out.push_str("\nmedium        stored   removed      live\n");
        for m in &r.media {
            out.push_str(&format!(
                "{:<10}  {:>8}  {:>8}  {:>8}\n",
                m.medium.as_deref().unwrap_or("(none)"),
                m.blocks_stored,
                m.blocks_removed,
                m.blocks_live
            ));
        }
    }
    if r.removed_unknown > 0 {
        out.push_str(&format!(
            "\n{} removals name blocks the index never held: the recording started after the engine did, or \
             events were lost.\n",
            r.removed_unknown
        ));
    }
    out
}
