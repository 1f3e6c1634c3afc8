//! `PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF` text (`c10/cuda/CUDAAllocatorConfig.cpp`
//! `parseArgs`) and a snapshot's `allocator_settings` dict → [`CachingSettings`].
//!
//! The text is comma-separated `key:value` pairs; `roundup_power2_divisions` also takes a list
//! `[256:1,512:2,>:8]` keyed by power-of-two MiB boundaries. An unknown key, a malformed pair or
//! a value out of PyTorch's range is an error naming the pair, as PyTorch refuses it too.

use gpumem_core::alloc::caching::settings::ROUNDUP_INTERVALS;
use gpumem_core::alloc::caching::CachingSettings;

use crate::pickle::Value;

const MIB: u64 = 1 << 20;
/// `kLargeBuffer` in MiB: `max_split_size_mb` and `max_non_split_rounding_mb` must exceed it.
const LARGE_BUFFER_MB: u64 = 20;

/// Keys PyTorch accepts that change nothing gpumem models (threads, pinned host memory).
const INERT_KEYS: [&str; 4] = [
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
    "graph_capture_record_stream_reuse",
];

/// Parses `text` on top of `base` (PyTorch applies the text to its defaults).
pub fn parse(text: &str, base: CachingSettings) -> Result<CachingSettings, String> {
    let mut s = base;
    for item in split_top_level(text)? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (key, value) = item
            .split_once(':')
            .ok_or_else(|| format!("'{item}': expected key:value"))?;
        let (key, value) = (key.trim(), value.trim());
        let bad = |why: &str| format!("'{item}': {why}");
        match key {
            "max_split_size_mb" => {
                let mb = parse_u64(value).map_err(|e| bad(&e))?;
                if mb <= LARGE_BUFFER_MB {
                    return Err(bad(&format!("must be > {LARGE_BUFFER_MB}")));
                }
                s.max_split_bytes = Some(mb.checked_mul(MIB).ok_or_else(|| bad("too large"))?);
            }
            "max_non_split_rounding_mb" => {
                let mb = parse_u64(value).map_err(|e| bad(&e))?;
                if mb <= LARGE_BUFFER_MB {
                    return Err(bad(&format!("must be > {LARGE_BUFFER_MB}")));
                }
                s.max_non_split_rounding_bytes =
                    mb.checked_mul(MIB).ok_or_else(|| bad("too large"))?;
            }
            "garbage_collection_threshold" => {
                let t = parse_f64(value).map_err(|e| bad(&e))?;
                if !(t > 0.0 && t < 1.0) {
                    return Err(bad("must be in (0, 1)"));
                }
                s.garbage_collection_threshold = t;
            }
            "per_process_memory_fraction" => {
                let f = parse_f64(value).map_err(|e| bad(&e))?;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(bad("must be in (0, 1]"));
                }
                s.memory_fraction = Some(f);
            }
            "expandable_segments" => {
                s.expandable_segments = match value {
                    "True" | "true" => true,
                    "False" | "false" => false,
                    _ => return Err(bad("expected True or False")),
                }
            }
            "roundup_power2_divisions" => {
                s.roundup_power2_divisions = parse_divisions(value).map_err(|e| bad(&e))?;
            }
            "backend" => match value {
                "native" => {}
                "cudaMallocAsync" => {
                    return Err(bad(
                        "cudaMallocAsync does not use the caching allocator gpumem models",
                    ))
                }
                _ => return Err(bad("expected native or cudaMallocAsync")),
            },
            k if INERT_KEYS.contains(&k) => {}
            _ => {
                return Err(format!(
                    "'{item}': unknown key '{key}'; known: max_split_size_mb, \
                     max_non_split_rounding_mb, garbage_collection_threshold, \
                     per_process_memory_fraction, expandable_segments, \
                     roundup_power2_divisions, backend, {}",
                    INERT_KEYS.join(", ")
                ))
            }
        }
    }
    s.validate()?;
    Ok(s)
}

/// Splits on commas outside `[...]`.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0u32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("'{text}': ']' without '['"))?
            }
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("'{text}': '[' without ']'"));
    }
    out.push(&text[start..]);
    Ok(out)
}

fn parse_u64(v: &str) -> Result<u64, String> {
    v.parse::<u64>()
        .map_err(|_| format!("'{v}' is not a non-negative integer"))
}

fn parse_f64(v: &str) -> Result<f64, String> {
    let f = v
        .parse::<f64>()
        .map_err(|_| format!("'{v}' is not a number"))?;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(format!("'{v}' is not a finite number"))
    }
}

fn check_division(d: u64) -> Result<u64, String> {
    if d == 0 || d.is_power_of_two() {
        Ok(d)
    } else {
        Err(format!("divisions {d} must be 0 or a power of two"))
    }
}

/// `N` (every interval) or `[MB:N,...,>:N]`: the first key also fills the intervals below it,
/// `>` those after the last key.
fn parse_divisions(value: &str) -> Result<[u64; ROUNDUP_INTERVALS], String> {
    let Some(list) = value.strip_prefix('[') else {
        let d = check_division(parse_u64(value)?)?;
        return Ok([d; ROUNDUP_INTERVALS]);
    };
    let list = list
        .strip_suffix(']')
        .ok_or_else(|| format!("'{value}': a list must end with ']'"))?;
    let mut out = [0u64; ROUNDUP_INTERVALS];
    let mut last: Option<usize> = None;
    for pair in list.split(',') {
        let (k, v) = pair
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("'{pair}': expected MB:divisions"))?;
        let d = check_division(parse_u64(v.trim())?)?;
        if k.trim() == ">" {
            let from = last.map_or(0, |l| l + 1);
            for slot in out.iter_mut().skip(from) {
                *slot = d;
            }
            continue;
        }
        let mb = parse_u64(k.trim())?;
        if !mb.is_power_of_two() {
            return Err(format!("'{pair}': the size {mb} MB must be a power of two"));
        }
        let index = (mb.trailing_zeros() as usize).min(ROUNDUP_INTERVALS - 1);
        if last.is_none() {
            for slot in out.iter_mut().take(index) {
                *slot = d;
            }
        }
        out[index] = d;
        last = Some(index);
    }
    Ok(out)
}

/// A snapshot's `allocator_settings` (torch ≥ 2.1): `max_split_size` in bytes (−1 or `SIZE_MAX`:
/// none), `garbage_collection_threshold`, `expandable_segments`, `roundup_power2_divisions`
/// (`{"1": d, "2": d, …, "32768": d}` keyed by MiB boundaries). Missing keys keep the defaults;
/// keys gpumem does not model are ignored.
pub fn from_snapshot(v: &Value) -> Result<CachingSettings, String> {
    let mut s = CachingSettings::default();
    if v.as_dict().is_none() {
        return Err(format!(
            "allocator_settings must be a dict, found {}",
            v.type_name()
        ));
    }
    if let Some(m) = v.get("max_split_size") {
        let i = m.as_i128().ok_or_else(|| {
            format!(
                "allocator_settings.max_split_size must be an integer, found {}",
                m.type_name()
            )
        })?;
        s.max_split_bytes = match i {
            i if i < 0 || i >= i128::from(u64::MAX) => None,
            i => Some(i as u64),
        };
    }
    if let Some(t) = v.get("garbage_collection_threshold") {
        s.garbage_collection_threshold = match t {
            Value::Float(f) => *f,
            Value::Int(i) => *i as f64,
            other => {
                return Err(format!(
                    "allocator_settings.garbage_collection_threshold must be a number, found {}",
                    other.type_name()
                ))
            }
        };
    }
    if let Some(e) = v.get("expandable_segments") {
        s.expandable_segments = e.as_bool().ok_or_else(|| {
            format!(
                "allocator_settings.expandable_segments must be a bool, found {}",
                e.type_name()
            )
        })?;
    }
    if let Some(r) = v.get("roundup_power2_divisions") {
        let pairs = r.as_dict().ok_or_else(|| {
            format!(
                "allocator_settings.roundup_power2_divisions must be a dict, found {}",
                r.type_name()
            )
        })?;
        for (k, d) in pairs {
            let what = "allocator_settings.roundup_power2_divisions";
            let mb: u64 = k
                .as_str()
                .and_then(|k| k.parse().ok())
                .filter(|mb: &u64| mb.is_power_of_two())
                .ok_or_else(|| format!("{what}: a key must be a power of two of MB"))?;
            let d = d
                .as_i128()
                .and_then(|d| u64::try_from(d).ok())
                .ok_or_else(|| format!("{what}: divisions must be non-negative integers"))?;
            let index = (mb.trailing_zeros() as usize).min(ROUNDUP_INTERVALS - 1);
            s.roundup_power2_divisions[index] = check_division(d)?;
        }
    }
    s.validate()
        .map_err(|e| format!("allocator_settings: {e}"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<CachingSettings, String> {
        parse(text, CachingSettings::default())
    }

    #[test]
    fn the_issue_example_parses_to_each_setting() {
        let s = p("expandable_segments:True,max_split_size_mb:128,roundup_power2_divisions:4,garbage_collection_threshold:0.6").unwrap();
        assert!(s.expandable_segments);
        assert_eq!(s.max_split_bytes, Some(128 * MIB));
        assert_eq!(s.roundup_power2_divisions, [4; ROUNDUP_INTERVALS]);
        assert_eq!(s.garbage_collection_threshold, 0.6);
        assert_eq!(p("").unwrap(), CachingSettings::default());
    }

    #[test]
    fn division_lists_fill_below_the_first_key_and_after_the_last() {
        let s = p("roundup_power2_divisions:[256:1,512:2,>:8]").unwrap();
        let mut want = [0u64; ROUNDUP_INTERVALS];
        want[..=8].fill(1);
        want[9] = 2;
        want[10..].fill(8);
        assert_eq!(s.roundup_power2_divisions, want);
        // A list beside other keys: commas inside the brackets do not split pairs.
        let s = p("roundup_power2_divisions:[1:4,>:2],expandable_segments:False").unwrap();
        assert_eq!(s.roundup_power2_divisions[0], 4);
        assert_eq!(s.roundup_power2_divisions[1], 2);
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        for (text, says) in [
            ("max_split_size_mb:20", "must be > 20"),
            ("max_split_size_mb:lots", "not a non-negative integer"),
            ("garbage_collection_threshold:1.0", "(0, 1)"),
            ("expandable_segments:yes", "True or False"),
            ("roundup_power2_divisions:3", "power of two"),
            ("roundup_power2_divisions:[300:2]", "power of two"),
            ("roundup_power2_divisions:[1:2", "without ']'"),
            ("max_split_sise_mb:128", "unknown key 'max_split_sise_mb'"),
            ("expandable_segments", "expected key:value"),
            (
                "backend:cudaMallocAsync",
                "does not use the caching allocator",
            ),
        ] {
            let e = p(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
