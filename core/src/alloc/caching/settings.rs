//! The allocator's settings (`PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF`, notes §1.1) and
//! the two size computations they change: `round_size` and the oversize rules.
//!
//! Values are held as PyTorch holds them once parsed (bytes, divisions per power-of-two
//! interval, a `double` threshold and fraction); parsing the text is the importer's business.

use serde::{Deserialize, Serialize};

use super::LARGE_BUFFER;
use crate::alloc::units::{align_up, MIB};

/// `kRoundUpPowerOfTwoIntervals`: one division setting per power-of-two interval from 1 MiB
/// (everything below 2 MiB shares the first) to 32 GiB and above (the last).
pub const ROUNDUP_INTERVALS: usize = 16;

/// The settings that change where blocks go. `Default` is PyTorch's default.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CachingSettings {
    /// `expandable_segments`: grow one mapped virtual range per (stream, pool).
    pub expandable_segments: bool,
    /// `max_split_size_mb` in bytes; `None` is PyTorch's default, no limit (`SIZE_MAX`).
    pub max_split_bytes: Option<u64>,
    /// `max_non_split_rounding_mb` in bytes: how much larger than an oversize request a cached
    /// oversize block may be and still serve it (20 MiB by default).
    pub max_non_split_rounding_bytes: u64,
    /// `roundup_power2_divisions`, per interval (0 or 1: no rounding beyond 512 B).
    pub roundup_power2_divisions: [u64; ROUNDUP_INTERVALS],
    /// `garbage_collection_threshold` in (0, 1); 0 is off. Only acts with a memory fraction.
    pub garbage_collection_threshold: f64,
    /// `per_process_memory_fraction` (`torch.cuda.set_per_process_memory_fraction`) in (0, 1];
    /// `None`: no fraction set (the allocator then never refuses by itself and never collects).
    pub memory_fraction: Option<f64>,
}

impl Default for CachingSettings {
    fn default() -> Self {
        CachingSettings {
            expandable_segments: false,
            max_split_bytes: None,
            max_non_split_rounding_bytes: LARGE_BUFFER,
            roundup_power2_divisions: [0; ROUNDUP_INTERVALS],
            garbage_collection_threshold: 0.0,
            memory_fraction: None,
        }
    }
}

/// Floats compared by their bits: a setting is exactly what was parsed, and specs that hold one
/// compare equal only when they read back to the same value.
impl PartialEq for CachingSettings {
    fn eq(&self, other: &Self) -> bool {
        let bits = |f: f64| f.to_bits();
        self.expandable_segments == other.expandable_segments
            && self.max_split_bytes == other.max_split_bytes
            && self.max_non_split_rounding_bytes == other.max_non_split_rounding_bytes
            && self.roundup_power2_divisions == other.roundup_power2_divisions
            && bits(self.garbage_collection_threshold) == bits(other.garbage_collection_threshold)
            && self.memory_fraction.map(bits) == other.memory_fraction.map(bits)
    }
}

impl Eq for CachingSettings {}

impl CachingSettings {
    /// `max_split_size`, with "no limit" as `u64::MAX` (PyTorch's `SIZE_MAX`).
    pub fn max_split(&self) -> u64 {
        self.max_split_bytes.unwrap_or(u64::MAX)
    }

    /// `roundup_power2_divisions(size)`: the interval of ⌊log2 size⌋ − 20, clamped to [0, 15].
    pub fn divisions_for(&self, bytes: u64) -> u64 {
        let log2 = 63 - u64::from(bytes.max(1).leading_zeros());
        let index = log2.saturating_sub(20).min(ROUNDUP_INTERVALS as u64 - 1);
        self.roundup_power2_divisions[index as usize]
    }

    /// `round_size`: at least `min_block`, then either the next power-of-two division (when the
    /// interval has more than one division and the size exceeds `min_block × divisions`) or a
    /// multiple of `min_block`. `None` on overflow.
    pub fn round_size(&self, bytes: u64, min_block: u64) -> Option<u64> {
        if bytes < min_block {
            return Some(min_block);
        }
        let divisions = self.divisions_for(bytes);
        if divisions > 1 && bytes > min_block.saturating_mul(divisions) {
            return roundup_power2_next_division(bytes, divisions);
        }
        align_up(bytes, min_block)
    }

    /// The allowed maximum a memory fraction sets on a device of `capacity_bytes`.
    pub fn allowed_bytes(&self, capacity_bytes: u64) -> Option<u64> {
        self.memory_fraction
            .map(|f| (f * capacity_bytes as f64) as u64)
    }

    /// Whether garbage collection runs: a threshold and a memory fraction are both set.
    pub fn collects_garbage(&self) -> bool {
        self.memory_fraction.is_some() && self.garbage_collection_threshold > 0.0
    }

    /// Checks the ranges PyTorch's parser enforces.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.max_split_bytes {
            if m < LARGE_BUFFER {
                return Err(format!(
                    "max_split_size {m} bytes is below the minimum of {} MiB",
                    LARGE_BUFFER / MIB
                ));
            }
        }
        if self.max_non_split_rounding_bytes < LARGE_BUFFER {
            return Err(format!(
                "max_non_split_rounding {} bytes is below the minimum of {} MiB",
                self.max_non_split_rounding_bytes,
                LARGE_BUFFER / MIB
            ));
        }
        if let Some(d) = self
            .roundup_power2_divisions
            .iter()
            .find(|&&d| d != 0 && !d.is_power_of_two())
        {
            return Err(format!(
                "roundup_power2_divisions {d} is neither 0 nor a power of two"
            ));
        }
        let t = self.garbage_collection_threshold;
        if !(t == 0.0 || (t > 0.0 && t < 1.0)) {
            return Err(format!("garbage_collection_threshold {t} is not in (0, 1)"));
        }
        if let Some(f) = self.memory_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!("memory fraction {f} is not in (0, 1]"));
            }
        }
        Ok(())
    }
}

/// `roundup_power2_next_division`: `bytes` rounded up to the next of `divisions` equal steps
/// between the powers of two around it (1200 with 4 divisions → 1280); a power of two stays.
fn roundup_power2_next_division(bytes: u64, divisions: u64) -> Option<u64> {
    if bytes.is_power_of_two() {
        return Some(bytes);
    }
    let floor = 1u64 << (63 - bytes.leading_zeros());
    let step = floor >> (63 - divisions.leading_zeros());
    if step == 0 {
        return floor.checked_mul(2);
    }
    align_up(bytes, step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_divisions_round_as_pytorch_documents() {
        let mut s = CachingSettings {
            roundup_power2_divisions: [4; ROUNDUP_INTERVALS],
            ..CachingSettings::default()
        };
        // The example of CUDACachingAllocator.cpp's comment, on the division itself…
        assert_eq!(roundup_power2_next_division(1200, 4), Some(1280));
        assert_eq!(roundup_power2_next_division(1024, 4), Some(1024));
        // …which round_size only applies above 512 B × divisions.
        assert_eq!(s.round_size(1200, 512), Some(1536));
        assert_eq!(s.round_size(2049, 512), Some(2560));
        // At most 512 × divisions: plain 512 B rounding.
        assert_eq!(s.round_size(2000, 512), Some(2048));
        assert_eq!(s.round_size(1500, 512), Some(1536));
        // 5 MiB + 1 between 4 and 8 MiB in steps of 1 MiB.
        assert_eq!(s.round_size(5 * MIB + 1, 512), Some(6 * MIB));
        s.roundup_power2_divisions = [0; ROUNDUP_INTERVALS];
        assert_eq!(s.round_size(5 * MIB + 1, 512), Some(5 * MIB + 512));
        assert_eq!(s.round_size(1, 512), Some(512));
    }

    #[test]
    fn divisions_are_looked_up_per_power_of_two_interval() {
        let mut s = CachingSettings::default();
        for (i, d) in s.roundup_power2_divisions.iter_mut().enumerate() {
            *d = i as u64;
        }
        assert_eq!(s.divisions_for(1), 0);
        assert_eq!(s.divisions_for(2 * MIB - 1), 0);
        assert_eq!(s.divisions_for(2 * MIB), 1);
        assert_eq!(s.divisions_for(256 * MIB), 8);
        assert_eq!(s.divisions_for(u64::MAX), 15);
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = CachingSettings {
            max_split_bytes: Some(MIB),
            ..CachingSettings::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_split_size"));
        let bad = CachingSettings {
            garbage_collection_threshold: 1.0,
            ..CachingSettings::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("garbage_collection_threshold"));
        assert!(CachingSettings::default().validate().is_ok());
    }
}
