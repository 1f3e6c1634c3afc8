//! `--execute host|cuda` for the runs whose engines sleep and wake (`gpumem models`, `gpumem
//! colocate`): the flags, the device executor (the one of `gpumem kv` and `gpumem alloc`:
//! `DeviceExecutor` over host memory, scaled by `Scaled`, or CUDA), and the report of what the
//! device observed beside the simulated one.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use gpumem_core::books::Books;
use gpumem_core::executor::Executor;
use gpumem_gpu::{check_room, CudaDevice, Device, DeviceExecutor, ExecReport, HostDevice, Scaled};
use gpumem_sim::report::human_bytes;
use gpumem_sim::sleep_watch::SleepObservations;
use gpumem_sim::spec::{ExecuteDevice, SleepExecuteSpec};

use crate::alloc_cmd::{parse_faults, ExecuteArg, INJECT_NEEDS_EXECUTE};

/// The execution flags shared by `models` and `colocate`.
#[derive(Args, Clone)]
pub struct SleepExecuteArgs {
    /// Also carry the run's memory decisions out on real memory and check them: `host`
    /// (anywhere: sleep unmaps with MADV_DONTNEED and wakes at the same mmap'd addresses) or
    /// `cuda` (needs an NVIDIA driver). Weights and KV blocks are written with a pattern of
    /// their content, every backup and restore is checked at both ends; the run must make the
    /// simulation's decisions (equal digests). Exit 1 on any wrong byte, digest difference or
    /// range that woke at another address.
    #[arg(long, value_enum, value_name = "DEVICE")]
    pub execute: Option<ExecuteArg>,

    /// With --execute host: carry every weight (and KV) range out at 1/K of its size (K a
    /// power of two up to 512), so that five 8B models fit in a few hundred MB of host memory.
    /// Decisions, report and digest stay those of the full-size run; only the real memory
    /// shrinks (rss_drop_bytes is measured at that size).
    #[arg(long, value_name = "1/K", default_value = "1", value_parser = parse_scale)]
    pub weight_bytes_scale: u64,

    /// With --execute: seeded fault injection, to prove the checks can fail.
    /// `corrupt-backup` flips a byte of a sleep's host backup after it was stored: the wake
    /// that restores it must refuse it (the weights are then reloaded from storage and the run
    /// exits 1). Also `corrupt-transfer`, `corrupt-block`, `refuse-alloc`; `:N` picks the N-th
    /// candidate, else --seed picks one of the first 64. Repeatable.
    #[arg(long, value_name = "FAULT")]
    pub inject: Vec<String>,
}

/// `1/K` or `K`: K a power of two from 1 to 512.
fn parse_scale(s: &str) -> Result<u64, String> {
    let k = s.trim().strip_prefix("1/").unwrap_or(s.trim());
    let k: u64 = k
        .parse()
        .map_err(|_| format!("{s:?}: expected 1/K, K a power of two from 1 to 512 (e.g. 1/512)"))?;
    if !(1..=gpumem_gpu::scaled::MAX_SCALE).contains(&k) || !k.is_power_of_two() {
        return Err(format!(
            "{s:?}: K must be a power of two from 1 to {}",
            gpumem_gpu::scaled::MAX_SCALE
        ));
    }
    Ok(k)
}

impl SleepExecuteArgs {
    /// The flags as a spec's `execute` (checked first: None with neither --inject nor a scale).
    pub fn to_spec(&self) -> Result<Option<SleepExecuteSpec>, String> {
        self.validate()?;
        Ok(self.execute.map(|device| SleepExecuteSpec {
            device: device.into(),
            weight_bytes_scale: self.weight_bytes_scale,
            inject: self.inject.clone(),
        }))
    }

    /// A spec's `execute` as the flags that make it, checked as the flags are.
    pub fn from_spec(spec: Option<&SleepExecuteSpec>) -> Result<SleepExecuteArgs, String> {
        let args = match spec {
            None => SleepExecuteArgs {
                execute: None,
                weight_bytes_scale: 1,
                inject: Vec::new(),
            },
            Some(e) => SleepExecuteArgs {
                execute: Some(match e.device {
                    ExecuteDevice::Host => ExecuteArg::Host,
                    ExecuteDevice::Cuda => ExecuteArg::Cuda,
                }),
                weight_bytes_scale: parse_scale(&e.weight_bytes_scale.to_string())
                    .map_err(|m| format!("execute.weight_bytes_scale {m}"))?,
                inject: e.inject.clone(),
            },
        };
        args.validate()?;
        Ok(args)
    }

    /// Refuses flags that need `--execute`, and a scale CUDA cannot map.
    pub fn validate(&self) -> Result<(), String> {
        match self.execute {
            None if !self.inject.is_empty() => Err(INJECT_NEEDS_EXECUTE.into()),
            None if self.weight_bytes_scale != 1 => Err(
                "--weight-bytes-scale needs --execute host: it scales real memory, not the simulation"
                    .into(),
            ),
            Some(ExecuteArg::Cuda) if self.weight_bytes_scale != 1 => Err(
                "--weight-bytes-scale needs --execute host: CUDA maps whole 2 MiB pages, which a scaled range is not"
                    .into(),
            ),
            _ => parse_faults(&self.inject).map(|_| ()),
        }
    }
}

/// What a run on the device gave: its own report, what it observed of sleeps and wakes, and
/// the executor's report.
pub struct Executed<R> {
    pub report: R,
    pub observed: SleepObservations,
    pub exec: ExecReport,
}

/// The sum of every place's peak in `books`: an upper bound of what a run held at once.
pub fn peak_bytes(books: &Books) -> u64 {
    books
        .accounts()
        .map(|(_, a)| a.reserved_bytes_peak)
        .fold(0u64, u64::saturating_add)
}

/// A run on any executor: its report and what the executor observed of sleeps and wakes.
pub type RunOn<'a, R> = dyn FnMut(&mut dyn Executor) -> Result<(R, SleepObservations), String> + 'a;

/// Runs `run` again on the device the flags name, with `books` (the simulated run's places
/// and capacities). `peak_bytes` (the simulation's) is checked against what the device has
/// first, so a run too large for it is a clear error, not an OOM half way.
pub fn execute<R>(
    args: &SleepExecuteArgs,
    device: ExecuteArg,
    seed: u64,
    books: Books,
    peak_bytes: u64,
    what: &str,
    run: &mut RunOn<'_, R>,
) -> Result<Executed<R>, String> {
    let faults = parse_faults(&args.inject)?;
    fn on<D: Device, R>(
        mut device: D,
        books: Books,
        faults: &[gpumem_gpu::Inject],
        seed: u64,
        peak_bytes: u64,
        what: &str,
        run: &mut RunOn<'_, R>,
    ) -> Result<Executed<R>, String> {
        check_room(&mut device, peak_bytes, what)
            .map_err(|e| e.replace("(--execute-scale)", "(--weight-bytes-scale 1/512)"))?;
        let mut exec = DeviceExecutor::with_books(device, books, faults, seed);
        let (report, observed) = run(&mut exec)?;
        Ok(Executed {
            report,
            observed,
            exec: exec.finish(),
        })
    }
    match device {
        ExecuteArg::Host => {
            let host = Scaled::new(HostDevice::new(), args.weight_bytes_scale)?;
            on(host, books, &faults, seed, peak_bytes, what, run)
        }
        ExecuteArg::Cuda => {
            let cuda = CudaDevice::open(0).map_err(|e| format!("--execute cuda: {e}"))?;
            on(cuda, books, &faults, seed, peak_bytes, what, run)
        }
    }
}

/// Whether the device saw what the policy expected: no wrong byte, the simulation's digest,
/// every wake at the same addresses.
pub fn passed(executed_digest: &str, simulated_digest: &str, e: &Executed<impl Sized>) -> bool {
    e.exec.mismatches == 0
        && executed_digest == simulated_digest
        && e.exec.digest == simulated_digest
        && e.observed.addresses_preserved != Some(false)
}

/// The executed report's JSON with what the device observed: `digest_simulated`,
/// `addresses_preserved`, `rss_drop_bytes`, `bytes_verified` and `mismatches` at the top (as
/// `gpumem kv --execute` has the last two), and the whole `execution` (the executor's report,
/// the sleep observations and the scale).
pub fn json_with_execution(
    mut value: Value,
    simulated_digest: &str,
    scale: u64,
    e: &Executed<impl Sized>,
) -> Value {
    value["digest_simulated"] = simulated_digest.into();
    value["addresses_preserved"] = serde_json::to_value(e.observed.addresses_preserved).unwrap();
    value["rss_drop_bytes"] = serde_json::to_value(e.observed.rss_drop_bytes).unwrap();
    value["bytes_verified"] = e.exec.bytes_verified.into();
    value["mismatches"] = e.exec.mismatches.into();
    let mut exec = serde_json::to_value(&e.exec).expect("report serializes");
    let observed = serde_json::to_value(&e.observed).expect("report serializes");
    if let (Some(exec), Some(observed)) = (exec.as_object_mut(), observed.as_object()) {
        for (k, v) in observed {
            exec.insert(k.clone(), v.clone());
        }
        exec.insert("weight_bytes_scale".into(), format!("1/{scale}").into());
    }
    value["execution"] = exec;
    value
}

/// The text lines of what the device observed.
pub fn text(
    simulated_digest: &str,
    executed_digest: &str,
    scale: u64,
    e: &Executed<impl Sized>,
) -> String {
    let x = &e.exec;
    let o = &e.observed;
    let equal = executed_digest == simulated_digest && x.digest == simulated_digest;
    let in_memory = match scale {
        1 => String::new(),
        k => format!(" (as the decisions name them; 1/{k} of that in memory)"),
    };
    let mut out = format!(
        "\nexecuted on {}: digests {}, {} verified{in_memory}, {} mismatched bytes\n",
        x.device,
        if equal {
            "equal to the simulation's"
        } else {
            "DIFFER from the simulation's"
        },
        human_bytes(x.bytes_verified),
        x.mismatches,
    );
    let addresses = match o.addresses_preserved {
        Some(true) => "every range at its first address",
        Some(false) => "SOME RANGES MOVED",
        None => "addresses not observed",
    };
    out += &format!(
        "  {} sleeps, {} wakes ({addresses}: {} ranges checked, {} moved); resident memory given back by the sleeps: {}\n",
        o.sleeps,
        o.wakes,
        o.ranges_checked,
        o.ranges_moved,
        o.rss_drop_bytes
            .map_or("not measured".to_string(), human_bytes),
    );
    if o.restores_refused > 0 {
        out += &format!(
            "  {} restores refused: a backup held other bytes than the weights, which were reloaded from storage instead\n",
            o.restores_refused
        );
    }
    if let Some(note) = crate::kv_cmd::unseen_injection(x) {
        out += &format!("  {note}\n");
    }
    let hit = x.injected_corruptions
        + x.injected_transfer_corruptions
        + x.injected_offload_corruptions
        + x.injected_backup_corruptions
        + x.injected_refusals
        + x.injections_moved_on;
    if !x.injections.is_empty() && hit == 0 {
        out += &format!(
            "  the injected {} hit nothing: the run has fewer candidates (e.g. {} sleeps); name one with :N\n",
            x.injections.join(", "),
            o.sleeps
        );
    }
    out
}

/// Exit 1 when the device saw something other than the policy expected.
/// Prints an executed run — JSON with the execution's fields, or the text report then the
/// execution's lines — and gives its exit code: 1 where the device disagreed with the
/// simulation.
pub fn print_executed<R: serde::Serialize>(
    json: bool,
    simulated_digest: &str,
    executed_digest: &str,
    scale: u64,
    executed: &Executed<R>,
    render_text: impl Fn(&R) -> String,
) -> Result<ExitCode, String> {
    let ok = passed(executed_digest, simulated_digest, executed);
    if json {
        let value = serde_json::to_value(&executed.report).expect("report serializes");
        let value = json_with_execution(value, simulated_digest, scale, executed);
        crate::output::println(&serde_json::to_string(&value).expect("report serializes"))?;
    } else {
        let mut text = render_text(&executed.report);
        text += &self::text(simulated_digest, executed_digest, scale, executed);
        crate::output::print(&text)?;
    }
    Ok(exit_code(ok))
}

pub fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
