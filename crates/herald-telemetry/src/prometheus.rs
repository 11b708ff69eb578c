//! Prometheus metrics: the `metrics` facade's global recorder, rendered in the text
//! exposition format with the standard process metrics.

use std::sync::Arc;

use herald_core::telemetry::{describe, names};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// Histogram buckets, in seconds: from a fast local confirm (1 ms) to a publish timeout.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The installed Prometheus recorder. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    handle: Arc<PrometheusHandle>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Installs a Prometheus recorder as the process's `metrics` recorder and describes
    /// herald's metrics. Fails if another recorder is installed (one per process).
    pub fn install() -> Result<Metrics, Error> {
        let mut builder = PrometheusBuilder::new();
        for name in names::HISTOGRAMS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), &BUCKETS)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        let handle = builder
            .install_recorder()
            .map_err(|_| Error::AlreadyInstalled("a metrics recorder"))?;
        describe();
        Ok(Metrics {
            handle: Arc::new(handle),
        })
    }

    /// Everything recorded, in the Prometheus text format, followed by the process metrics
    /// (`process_resident_memory_bytes`, `process_open_fds`, ...; on Linux).
    pub fn render(&self) -> String {
        // Histograms are folded in by the upkeep; without the exporter's own task, here.
        self.handle.run_upkeep();
        let mut out = self.handle.render();
        crate::process::render(&mut out);
        out
    }
}
