//! `gpumem kv`'s run: requests streamed through the `vllm-0.33` engine by the driver, the step
//! log written if asked, and what the report needs measured on the way ([`KvReport`]).

use std::io::Write;

use gpumem_core::executor::Executor;

use super::arrivals::Arrivals;
use super::driver::{drive, DriveOptions};
use super::metrics::Measured;
use super::report::{KvReport, RunInfo};
use super::step_log::StepLogWriter;
use super::vllm::{EngineConfig, VllmEngine};
use super::ServeError;

/// Runs `arrivals` through the `vllm-0.33` engine with `cfg`, writing the conformance step log
/// to `step_log` if given and calling `progress` with the tokens scheduled so far.
pub fn simulate(
    arrivals: &mut Arrivals<'_>,
    cfg: EngineConfig,
    info: RunInfo,
    step_log: Option<&mut dyn Write>,
    progress: &mut dyn FnMut(u64),
) -> Result<KvReport, ServeError> {
    simulate_on(arrivals, cfg, info, step_log, progress, None)
}

/// [`simulate`], with the KV pool carried out on an executor (`block_bytes` per block): every
/// computed block is written there and every prefix hit read back before it counts.
pub fn simulate_on(
    arrivals: &mut Arrivals<'_>,
    cfg: EngineConfig,
    info: RunInfo,
    mut step_log: Option<&mut dyn Write>,
    progress: &mut dyn FnMut(u64),
    exec: Option<(&mut dyn Executor, u64)>,
) -> Result<KvReport, ServeError> {
    let mut engine = VllmEngine::new(cfg)?;
    if let Some((mem, block_bytes)) = exec {
        engine.place(mem, block_bytes)?;
    }
    let mut writer = StepLogWriter::new();
    let mut measured = Measured::new(&cfg, &info);
    let sum = drive(
        &mut engine,
        arrivals,
        DriveOptions::default(),
        &mut |rec, engine| {
            if let Some(log) = step_log.as_mut() {
                log.write_all(writer.line(rec, engine))
                    .map_err(|e| ServeError::Io(e.to_string()))?;
            }
            measured.observe(rec);
            progress(measured.scheduled_tokens);
            Ok(())
        },
    )?;
    if let Some(log) = step_log {
        log.flush().map_err(|e| ServeError::Io(e.to_string()))?;
    }
    measured.rejected = arrivals.rejected();
    measured.prefix_hits_refused = engine.hits_refused();
    Ok(KvReport::new(&sum, measured, info))
}
