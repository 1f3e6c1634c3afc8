//! A request trace whose requests name their model: each request is given to the run's model
//! of that name, read lazily from a [`RequestStream`] (one request at a time, as `gpumem kv`
//! reads a trace).
//!
//! A request's model is the `model` field of the conformance and Mooncake JSON Lines, or
//! BurstGPT's `Model` column; it must equal one of the run's models as given (`NAME` or
//! `NAME@TAG`), or, with a [`ModelMap`], be one of the map's keys. Every refusal names the
//! trace's file and line.

use gpumem_traces::error::echo;
use gpumem_traces::serving::{RequestStream, WorkloadFormat, WorkloadRequest};
use gpumem_traces::TraceError;

use super::ModelChoice;
use crate::serve::vllm::MAX_CLOCK_US;
use crate::serve::ServeError;

/// Most entries of a [`ModelMap`].
pub const MAX_MAP_ENTRIES: usize = 64;

/// The names a trace gives its models (BurstGPT's `ChatGPT`, `GPT-4`), each mapped to one of
/// the run's models: `--model-map ChatGPT=llama-3.1-8b,GPT-4=qwen2.5-7b`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelMap {
    /// (trace's name, run's model), in the order given.
    entries: Vec<(String, String)>,
}

impl ModelMap {
    /// `FROM=TO,…`: names not empty, each FROM once.
    pub fn parse(text: &str) -> Result<ModelMap, String> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for item in text.split(',').map(str::trim) {
            let Some((from, to)) = item.split_once('=') else {
                return Err(format!(
                    "--model-map: \"{}\" is not TRACE_NAME=MODEL",
                    echo(item)
                ));
            };
            let (from, to) = (from.trim(), to.trim());
            if from.is_empty() || to.is_empty() {
                return Err(format!(
                    "--model-map: \"{}\" has an empty name on one side of '='",
                    echo(item)
                ));
            }
            if entries.iter().any(|(f, _)| f == from) {
                return Err(format!("--model-map: \"{}\" is mapped twice", echo(from)));
            }
            if entries.len() == MAX_MAP_ENTRIES {
                return Err(format!(
                    "--model-map: more than gpumem's limit of {MAX_MAP_ENTRIES} entries"
                ));
            }
            entries.push((from.to_string(), to.to_string()));
        }
        Ok(ModelMap { entries })
    }

    /// The trace's names, in the order given.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(f, _)| f.as_str())
    }

    /// Each entry's model as an index into `models`; refused when one is not a model of the
    /// run.
    fn resolve(&self, models: &[ModelChoice]) -> Result<Vec<(String, usize)>, String> {
        self.entries
            .iter()
            .map(
                |(from, to)| match models.iter().position(|m| &m.name == to) {
                    Some(i) => Ok((from.clone(), i)),
                    None => Err(format!(
                        "--model-map: {}={}: \"{}\" is not one of --models ({})",
                        echo(from),
                        echo(to),
                        echo(to),
                        names(models)
                    )),
                },
            )
            .collect()
    }
}

fn names(models: &[ModelChoice]) -> String {
    models
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The requests of a trace, each with the index of its model in the run.
pub struct TraceArrivals<'a> {
    stream: RequestStream<'a>,
    /// The run's models: (name, max_model_len).
    models: Vec<(String, u64)>,
    /// With a map: (trace's name, model index).
    map: Option<Vec<(String, usize)>>,
    burstgpt: bool,
    failed: bool,
}

impl<'a> TraceArrivals<'a> {
    /// The requests of `stream` (not read from yet) for `models`, each prompt shorter than
    /// its model's `max_model_len` ([`set_max_model_len`](Self::set_max_model_len); the
    /// driver sets it).
    pub fn new(
        mut stream: RequestStream<'a>,
        models: &[ModelChoice],
        map: Option<&ModelMap>,
    ) -> Result<Self, ServeError> {
        if !stream.read_models() {
            return Err(ServeError::Input(format!(
                "{}: a {} trace names no model; `gpumem models --trace` reads the `model` field of conformance and Mooncake JSON Lines, or BurstGPT's Model column",
                stream.source(),
                stream.format().name()
            )));
        }
        let map = match map {
            Some(m) => Some(m.resolve(models).map_err(ServeError::Input)?),
            None => None,
        };
        Ok(TraceArrivals {
            burstgpt: stream.format() == WorkloadFormat::BurstGpt,
            stream,
            models: models
                .iter()
                .map(|m| (m.name.clone(), m.profile.max_model_len))
                .collect(),
            map,
            failed: false,
        })
    }

    /// Model `i` takes prompts shorter than `max_model_len[i]`.
    pub fn set_max_model_len(&mut self, max_model_len: Vec<u64>) {
        for ((_, len), new) in self.models.iter_mut().zip(max_model_len) {
            *len = new;
        }
    }

    /// Warnings of the stream so far (ignored fields, skipped rows).
    pub fn warnings(&self) -> &[String] {
        self.stream.warnings()
    }

    pub fn source(&self) -> &str {
        self.stream.source()
    }

    fn model_of(&self, r: &WorkloadRequest) -> Result<usize, String> {
        let Some(name) = r.model.as_deref() else {
            return Err(
                "the request names no model: `gpumem models --trace` needs a \"model\" field on every request"
                    .into(),
            );
        };
        if let Some(map) = &self.map {
            return map
                .iter()
                .find(|(from, _)| from == name)
                .map(|&(_, i)| i)
                .ok_or_else(|| {
                    let keys: Vec<&str> = map.iter().map(|(f, _)| f.as_str()).collect();
                    format!(
                        "model \"{}\" is not in --model-map (its keys: {})",
                        echo(name),
                        echo(&keys.join(", "))
                    )
                });
        }
        self.models
            .iter()
            .position(|(m, _)| m == name)
            .ok_or_else(|| {
                let run: Vec<&str> = self.models.iter().map(|(m, _)| m.as_str()).collect();
                let hint = if self.burstgpt {
                    "; BurstGPT names its models ChatGPT and GPT-4: map them with --model-map ChatGPT=MODEL,GPT-4=MODEL"
                } else {
                    ""
                };
                format!(
                    "model \"{}\" is not one of --models ({}){hint}",
                    echo(name),
                    run.join(", ")
                )
            })
    }

    fn next_arrival(&mut self) -> Result<Option<(usize, WorkloadRequest)>, ServeError> {
        let Some(r) = self.stream.next().transpose()? else {
            return Ok(None);
        };
        let at = |m: String| ServeError::from(TraceError::at_line(self.stream.source(), r.line, m));
        let m = self.model_of(&r).map_err(at)?;
        let (name, max_model_len) = &self.models[m];
        let len = r.prompt.len();
        if len >= *max_model_len {
            return Err(at(format!(
                "the prompt has {len} tokens, but model {name} takes at most {} (max_model_len {max_model_len}: its profile's, or what its KV pool holds if less)",
                max_model_len.saturating_sub(1)
            )));
        }
        if r.arrival_us > MAX_CLOCK_US {
            return Err(at(format!(
                "arrival {} us is beyond the simulated clock ({MAX_CLOCK_US} us)",
                r.arrival_us
            )));
        }
        Ok(Some((m, r)))
    }
}

impl Iterator for TraceArrivals<'_> {
    type Item = Result<(usize, WorkloadRequest), ServeError>;

    /// The next request and its model; after an error, None.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.next_arrival();
        self.failed = r.is_err();
        r.transpose()
    }
}
