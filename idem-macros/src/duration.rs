//! Duration literals, parsed at compile time with the grammar of
//! `idem_core::options::parse_duration`: a whole number and `ms`, `s`, `m`, `h` or `d`.

/// The duration in milliseconds, or why the literal is refused.
pub(crate) fn parse_millis(s: &str) -> Result<u64, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let malformed = || {
        format!(
            "malformed duration {s:?}: write a whole number and a unit, \
             e.g. \"500ms\", \"30s\", \"15m\", \"24h\", \"7d\" (or any `Duration` expression)"
        )
    };
    if num.is_empty() {
        return Err(malformed());
    }
    let per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(malformed()),
    };
    let ms = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per_unit))
        .ok_or_else(|| format!("duration {s:?} is too large"))?;
    if ms == 0 {
        return Err(format!(
            "duration {s:?} is zero: a ttl, lease or wait_timeout must be positive"
        ));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn grammar_matches_the_runtime() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("15m"), Ok(900_000));
        assert_eq!(parse_millis("24h"), Ok(86_400_000));
        assert_eq!(parse_millis("7d"), Ok(604_800_000));
        for bad in [
            "",
            "s",
            "5",
            "5 s",
            "5sec",
            "-5s",
            "1.5h",
            "0s",
            "0ms",
            "99999999999999999d",
        ] {
            assert!(parse_millis(bad).is_err(), "{bad}");
        }
    }
}
