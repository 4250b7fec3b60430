//! Per-call options and duration parsing.

use std::time::Duration;

/// What a concurrent duplicate does while the first call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// Wait (up to `wait_timeout`) for the first call's result and return it.
    #[default]
    Wait,
    /// Return [`Error::InProgress`](crate::Error::InProgress) at once.
    Reject,
}

/// What a `None` key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// Fail with [`Error::MissingKey`](crate::Error::MissingKey).
    #[default]
    Error,
    /// Run the body unprotected, with a warning.
    Run,
}

/// The options of one idempotent call, with the attribute's defaults.
///
/// ```
/// let o = idem_core::Options::default();
/// assert_eq!(o.ttl, std::time::Duration::from_secs(24 * 3600));
/// assert_eq!(o.lease, std::time::Duration::from_secs(30));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// How long a completed result is replayed. Default 24 h.
    pub ttl: Duration,
    /// How long a claim is held before another caller may take it over; renewed every
    /// third of it while the body runs. Default 30 s.
    pub lease: Duration,
    /// Wait for or reject a concurrent duplicate. Default: wait.
    pub on_conflict: OnConflict,
    /// How long a duplicate waits before `InProgress`. Default 10 s.
    pub wait_timeout: Duration,
    /// Bumps the record's type tag. Default 0.
    pub version: u32,
    /// What a `None` key does. Default: error.
    pub missing_key: MissingKey,
    /// Run unprotected when the store fails to claim. Default: false (fail closed).
    pub fail_open: bool,
    /// A limit on encoded results below the store's own. Default: the store's. It bounds
    /// each durable step's stored value too.
    pub max_value_size: Option<usize>,
    /// The most durable steps ([`step`](crate::step())) one execution of the call may start;
    /// the next one fails with [`Error::TooManySteps`](crate::Error::TooManySteps). Default
    /// [`DEFAULT_MAX_STEPS`] (1,000).
    pub max_steps: u32,
}

/// The default [`Options::max_steps`]: 1,000 steps per call.
pub const DEFAULT_MAX_STEPS: u32 = 1_000;

impl Default for Options {
    fn default() -> Self {
        Options {
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            on_conflict: OnConflict::Wait,
            wait_timeout: Duration::from_secs(10),
            version: 0,
            missing_key: MissingKey::Error,
            fail_open: false,
            max_value_size: None,
            max_steps: DEFAULT_MAX_STEPS,
        }
    }
}

/// The longest `ttl`, `lease` or `wait_timeout` a call accepts: 100 years. Longer values
/// overflow some stores' clocks (an `Instant`, a millisecond `PX`), so they are refused with
/// [`Error::InvalidOption`](crate::Error::InvalidOption) instead.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

impl Options {
    /// Checks the durations: `ttl`, `lease` and `wait_timeout` must be more than zero and at
    /// most [`MAX_DURATION`]. `Call::run` checks this before it touches the store, so a bad
    /// value is a clear error, never a panic and never an unprotected run.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut o = idem_core::Options::default();
    /// assert!(o.validate().is_ok());
    /// o.lease = Duration::ZERO;
    /// assert!(matches!(o.validate(), Err(idem_core::Error::InvalidOption { option: "lease", .. })));
    /// o.lease = Duration::MAX;
    /// assert!(o.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), crate::Error> {
        for (option, d) in [
            ("ttl", self.ttl),
            ("lease", self.lease),
            ("wait_timeout", self.wait_timeout),
        ] {
            let reason = if d.is_zero() {
                "must be more than zero".to_string()
            } else if d > MAX_DURATION {
                format!("{d:?} is over the limit of 100 years")
            } else {
                continue;
            };
            return Err(crate::Error::InvalidOption { option, reason });
        }
        Ok(())
    }
}

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not `<digits><unit>`.
    #[error("malformed duration `{0}`: write a whole number and a unit, e.g. \"500ms\", \"30s\", \"15m\", \"24h\", \"7d\"")]
    Malformed(String),
    /// Zero is never a useful ttl, lease or timeout.
    #[error("duration `{0}` is zero")]
    Zero(String),
    /// Too large to represent.
    #[error("duration `{0}` overflows")]
    Overflow(String),
}

/// Parses `"500ms"`, `"30s"`, `"15m"`, `"24h"`, `"7d"`. The macro runs this at compile time.
///
/// ```
/// use std::time::Duration;
/// use idem_core::options::parse_duration;
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
/// assert!(parse_duration("0s").is_err());
/// assert!(parse_duration("5 minutes").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let malformed = || DurationError::Malformed(s.to_string());
    if num.is_empty() {
        return Err(malformed());
    }
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::Overflow(s.to_string()))?;
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(malformed()),
    };
    let ms = n
        .checked_mul(per_unit_ms)
        .ok_or_else(|| DurationError::Overflow(s.to_string()))?;
    if ms == 0 {
        return Err(DurationError::Zero(s.to_string()));
    }
    Ok(Duration::from_millis(ms))
}
