//! Byte sizes on the command line: `80GiB`, `512`, `2MiB`, `1.5G` (binary), `40GB` (decimal).

/// Parses a byte size. Binary suffixes (K, M, G, T with or without `iB`) and decimal ones (KB,
/// MB, GB, TB); a fraction is allowed with a suffix. Overflow is an error, never a wrap.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let number = number.replace('_', "");
    let multiplier: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit '{other}' in '{text}' (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)")),
    };
    if number.is_empty() {
        return Err(format!("'{text}' is not a size: no number"));
    }
    let too_large = || format!("size '{text}' does not fit in 64 bits");
    match number.split_once('.') {
        None => number
            .parse::<u64>()
            .map_err(|_| too_large())?
            .checked_mul(multiplier)
            .ok_or_else(too_large),
        Some((whole, frac)) => {
            if multiplier == 1 || frac.contains('.') {
                return Err(format!("'{text}' is not a whole number of bytes"));
            }
            let whole: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| too_large())?
            };
            let digits = frac.len().min(9) as u32;
            let frac_value: u64 = frac[..digits as usize].parse().unwrap_or(0);
            let scale = 10u64.pow(digits);
            let frac_bytes = (frac_value as u128 * multiplier as u128 / scale as u128) as u64;
            whole
                .checked_mul(multiplier)
                .and_then(|w| w.checked_add(frac_bytes))
                .ok_or_else(too_large)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("80G"), Ok(80 << 30));
        assert_eq!(parse_bytes("40GB"), Ok(40_000_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("1_024"), Ok(1024));
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("18446744073709551616").is_err());
        assert!(parse_bytes("17179869184GiB")
            .unwrap_err()
            .contains("64 bits"));
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_bytes("1.5").is_err());
    }
}
