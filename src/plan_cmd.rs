//! `gpumem plan --trace T --gpu h100,h200 --model M --slo ttft-p99=2s,tpot-p99=100ms`: per GPU
//! kind, the smallest fleet (`gpumem kv --replicas N --router R` runs) that meets every SLO
//! (`gpumem_sim::plan`), and the cheapest where the profiles carry a price.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};
use gpumem_sim::cluster::{RouterPolicy, MAX_REPLICAS};
use gpumem_sim::plan::{parse_slos, smallest, Slo, Trial};
use gpumem_sim::serve::{GpuProfile, KvReport, Percentiles};
use serde::Serialize;

use crate::kv_cmd::{self, KvOutcome};
use crate::sweep_cmd::KvPoint;

#[derive(Args)]
#[command(after_help = "Example:
  gpumem plan --trace conversation_trace.jsonl --gpu h100,h200 --model llama-3.1-8b \\
      --slo ttft-p99=2s,tpot-p99=100ms --router kv-aware --max-replicas 64

Each run is `gpumem kv --replicas N --router R` on the whole trace (or its first --limit
requests). The search tries 1, 2, 4, … replicas until a run meets every SLO, then bisects
between the last count that missed and the first that met; the answer's run and the run one
replica fewer are both shown. A GPU profile file with `price_per_hour_usd_cents: Some(N)`
prices the fleet, and the cheapest priced plan is named.")]
pub struct PlanArgs {
    /// Request trace (any format `gpumem kv` reads). Without it the built-in seeded workload.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Trace format [default: detected].
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,

    /// Use only the first N requests.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,

    /// GPU kinds to plan for, comma separated: built-in names or FILE.ron profiles.
    #[arg(
        long,
        value_name = "GPUS",
        default_value = "h100",
        value_delimiter = ','
    )]
    gpu: Vec<String>,

    /// Model: a built-in name or a FILE.ron profile.
    #[arg(long, value_name = "MODEL", default_value = "llama-3.1-8b")]
    model: String,

    /// Latency bounds every one of which the fleet must meet, comma separated:
    /// LATENCY-PCT=DURATION with LATENCY ttft, tpot or e2e, PCT p50, p90 or p99 and DURATION
    /// in us, ms or s (e.g. ttft-p99=2s,tpot-p99=100ms).
    #[arg(long, value_name = "SLOS", value_parser = parse_slos)]
    slo: std::vec::Vec<Slo>,

    /// Router in front of the replicas (as `gpumem kv --router`).
    #[arg(long, value_name = "POLICY", default_value = "kv-aware", value_parser = RouterPolicy::parse)]
    router: RouterPolicy,

    /// How late the engines' KV events reach the router, µs.
    #[arg(long, value_name = "US", default_value_t = 0)]
    router_lag_us: u64,

    /// Most replicas to try per GPU kind.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_replicas: u64,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// The answer for one GPU kind.
#[derive(Serialize)]
struct Plan {
    gpu: String,
    /// The smallest count that met every SLO; null when none up to `max_replicas` did.
    replicas: Option<u64>,
    /// The answer's run.
    metrics: Option<Metrics>,
    /// The fleet's price, where the GPU's profile has one.
    cost_per_hour_usd: Option<f64>,
    /// The run one replica fewer, which missed (null when the answer is 1 replica).
    one_fewer: Option<Metrics>,
    /// Replica counts run, in the order tried.
    tried: Vec<u64>,
}

/// What a run measured, and the SLOs it missed.
#[derive(Clone, Serialize)]
struct Metrics {
    replicas: u64,
    ttft_us: Percentiles,
    tpot_us: Percentiles,
    e2e_us: Percentiles,
    prefix_hit_rate: f64,
    throughput_tokens_per_s: f64,
    preemptions: u64,
    requests_rejected: u64,
    /// The SLOs the run missed, by name; a run that failed says why instead.
    missed: Vec<String>,
    error: Option<String>,
}

#[derive(Serialize)]
struct PlanReport {
    slo: Vec<SloReport>,
    router: String,
    router_lag_us: u64,
    max_replicas: u64,
    plans: Vec<Plan>,
    /// The GPU of the cheapest plan that met the SLOs, where plans are priced.
    cheapest: Option<String>,
}

#[derive(Serialize)]
struct SloReport {
    name: String,
    max_us: u64,
}

pub fn run(args: PlanArgs) -> Result<ExitCode, String> {
    if args.slo.is_empty() {
        return Err("--slo is needed: e.g. --slo ttft-p99=2s,tpot-p99=100ms".into());
    }
    if !(1..=MAX_REPLICAS).contains(&args.max_replicas) {
        return Err(format!(
            "--max-replicas {}: 1 to {MAX_REPLICAS}",
            args.max_replicas
        ));
    }
    let mut plans = Vec::new();
    for gpu in &args.gpu {
        let profile = GpuProfile::resolve(gpu)?;
        let search = smallest(args.max_replicas, |n| {
            let m = run_fleet(&args, gpu, n)?;
            Ok::<_, String>((m.missed.is_empty() && m.error.is_none(), m))
        })?;
        let metrics = search
            .answer
            .as_ref()
            .map(|t: &Trial<Metrics>| t.run.clone());
        let cost_per_hour_usd = match (&metrics, profile.price_per_hour_usd_cents) {
            (Some(m), Some(cents)) => Some(m.replicas as f64 * cents as f64 / 100.0),
            _ => None,
        };
        plans.push(Plan {
            gpu: profile.name.clone(),
            replicas: metrics.as_ref().map(|m| m.replicas),
            metrics,
            cost_per_hour_usd,
            one_fewer: search.one_fewer.map(|t| t.run),
            tried: search.tried,
        });
    }
    // Ties go to the GPU named first.
    let cheapest = plans
        .iter()
        .filter_map(|p| p.cost_per_hour_usd.map(|c| (c, &p.gpu)))
        .fold(None::<(f64, &String)>, |best, (c, g)| match best {
            Some((b, _)) if b <= c => best,
            _ => Some((c, g)),
        })
        .map(|(_, g)| g.clone());
    let report = PlanReport {
        slo: args
            .slo
            .iter()
            .map(|s| SloReport {
                name: s.name(),
                max_us: s.max_us,
            })
            .collect(),
        router: args.router.name(),
        router_lag_us: args.router_lag_us,
        max_replicas: args.max_replicas,
        plans,
        cheapest,
    };
    if args.json {
        crate::output::println(&serde_json::to_string(&report).expect("report serializes"))?;
    } else {
        crate::output::print(&render_text(&report))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `gpumem kv` with `n` replicas of `gpu` behind the router, quietly.
fn run_fleet(args: &PlanArgs, gpu: &str, n: u64) -> Result<Metrics, String> {
    let mut argv: Vec<String> = vec![
        format!("--gpu={gpu}"),
        format!("--model={}", args.model),
        format!("--replicas={n}"),
        format!("--router={}", args.router.name()),
        format!("--router-lag-us={}", args.router_lag_us),
    ];
    if let Some(t) = &args.trace {
        argv.push("--trace".into());
        argv.push(t.to_string_lossy().into_owned());
    }
    if let Some(f) = &args.format {
        argv.push(format!("--format={f}"));
    }
    if let Some(l) = args.limit {
        argv.push(format!("--limit={l}"));
    }
    let point = KvPoint::try_parse_from(argv).map_err(|e| e.to_string())?;
    let spec = kv_cmd::spec_for_many_runs(&point.args)?;
    let checked = kv_cmd::check(&spec)?;
    Ok(match kv_cmd::simulate_quietly(&spec, &checked)? {
        Ok(outcome) => metrics(&args.slo, n, &fleet(outcome)),
        Err(e) => Metrics {
            replicas: n,
            ttft_us: Percentiles::default(),
            tpot_us: Percentiles::default(),
            e2e_us: Percentiles::default(),
            prefix_hit_rate: 0.0,
            throughput_tokens_per_s: 0.0,
            preemptions: 0,
            requests_rejected: 0,
            missed: Vec::new(),
            error: Some(e.to_string()),
        },
    })
}

fn fleet(outcome: KvOutcome) -> KvReport {
    match outcome {
        KvOutcome::Single(r) => *r,
        KvOutcome::Cluster(c) => c.fleet,
    }
}

fn metrics(slos: &[Slo], replicas: u64, r: &KvReport) -> Metrics {
    Metrics {
        replicas,
        ttft_us: r.ttft_us,
        tpot_us: r.tpot_us,
        e2e_us: r.e2e_us,
        prefix_hit_rate: r.prefix_hit_rate,
        throughput_tokens_per_s: r.throughput_tokens_per_s,
        preemptions: r.preemptions,
        requests_rejected: r.requests_rejected,
        missed: slos
            .iter()
            .filter(|s| !s.met_by(r))
            .map(|s| s.name())
            .collect(),
        error: None,
    }
}

fn render_text(r: &PlanReport) -> String {
    use gpumem_sim::serve::report::{human_us, pct};
    let slo: Vec<String> = r
        .slo
        .iter()
        .map(|s| format!("{} <= {}", s.name, human_us(s.max_us)))
        .collect();
    let mut out = format!(
        "SLO           {}\nrouter        {}, KV events {} late; at most {} replicas per GPU kind\n\n",
        slo.join(", "),
        r.router,
        human_us(r.router_lag_us),
        r.max_replicas
    );
    out.push_str(&format!(
        "{:<12} {:>8} {:>10} {:>10} {:>9} {:>12} {:>9}\n",
        "gpu", "replicas", "TTFT p99", "TPOT p99", "hit rate", "tokens/s", "$/hour"
    ));
    for p in &r.plans {
        let Some(m) = &p.metrics else {
            out.push_str(&format!(
                "{:<12} {:>8}   no count up to {} meets the SLO (tried {:?})\n",
                p.gpu, "-", r.max_replicas, p.tried
            ));
            continue;
        };
        let cost = p
            .cost_per_hour_usd
            .map_or("-".into(), |c| format!("{c:.2}"));
        out.push_str(&format!(
            "{:<12} {:>8} {:>10} {:>10} {:>9} {:>12.0} {:>9}\n",
            p.gpu,
            m.replicas,
            human_us(m.ttft_us.p99),
            human_us(m.tpot_us.p99),
            pct(m.prefix_hit_rate),
            m.throughput_tokens_per_s,
            cost
        ));
        if let Some(below) = &p.one_fewer {
            let why = match &below.error {
                Some(e) => e.clone(),
                None => format!("misses {}", below.missed.join(", ")),
            };
            out.push_str(&format!(
                "{:<12} {:>8} {:>10} {:>10}   one fewer {why}\n",
                "",
                below.replicas,
                human_us(below.ttft_us.p99),
                human_us(below.tpot_us.p99)
            ));
        }
    }
    if let Some(g) = &r.cheapest {
        out.push_str(&format!("\ncheapest      {g}\n"));
    }
    out
}
