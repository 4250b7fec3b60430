//! Criterion settings shared by every group: a short warm-up and measurement, so that the
//! whole report runs in minutes. Command-line flags (`--measurement-time` ...) still override.

use std::time::Duration;

use criterion::Criterion;

pub fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(1000))
        .measurement_time(Duration::from_millis(2500))
        .sample_size(50)
        .without_plots()
}
