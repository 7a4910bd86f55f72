//! Prometheus metrics, all prefixed `shoal_`, in the OpenMetrics text format.
//!
//! Names follow llama-server's where there is one (prompt tokens, generated tokens,
//! requests processing and deferred) so dashboards carry over.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use shoal_pipeline::{BatchStats, WeightStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) endpoint: String,
    pub(crate) status: String,
}

/// Handles to every metric; cheap to clone (each is an `Arc` inside).
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) prompt_tokens: Counter,
    pub(crate) generated_tokens: Counter,
    pub(crate) decode_seconds: Counter<f64, AtomicU64>,
    pub(crate) time_to_first_token: Histogram,
    pub(crate) decode_tokens_per_second: Gauge<f64, AtomicU64>,
    pub(crate) in_flight: Gauge,
    pub(crate) queued: Gauge,
    pub(crate) cancelled: Counter,
    pub(crate) rejected: Counter,
    /// Generations that resumed from a kept prompt prefix, and the tokens they reused.
    pub(crate) prompt_cache_hits: Counter,
    pub(crate) prompt_cache_reused_tokens: Counter,
    /// Bytes of keys and values the prompt cache keeps, after the last generation.
    pub(crate) prompt_cache_bytes: Gauge,
    /// Tokens drafted for speculative decoding (prompt lookup, a draft model), and those the
    /// model kept.
    pub(crate) draft_tokens: Counter,
    pub(crate) draft_accepted_tokens: Counter,
    /// Batches of stage work run on this node (pipeline mode), read at each scrape.
    pub(crate) batches: BatchStats,
    /// Bytes of weights this node sent members and received (weights over the LAN), read at
    /// each scrape.
    pub(crate) weights: WeightStats,
}

impl Metrics {
    /// The metrics, registered in a fresh registry.
    pub(crate) fn new() -> (Self, Registry) {
        let metrics = Self {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            decode_seconds: Counter::default(),
            time_to_first_token: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            decode_tokens_per_second: Gauge::default(),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            cancelled: Counter::default(),
            rejected: Counter::default(),
            prompt_cache_hits: Counter::default(),
            prompt_cache_reused_tokens: Counter::default(),
            prompt_cache_bytes: Gauge::default(),
            draft_tokens: Counter::default(),
            draft_accepted_tokens: Counter::default(),
            batches: BatchStats::default(),
            weights: WeightStats::default(),
        };
        let mut registry = Registry::with_prefix("shoal");
        registry.register(
            "requests",
            "HTTP requests answered, by endpoint and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            metrics.generated_tokens.clone(),
        );
        registry.register_with_unit(
            "decode",
            "Time spent generating tokens after the first (rate(generated_tokens) / rate(decode_seconds) is the decode speed)",
            Unit::Seconds,
            metrics.decode_seconds.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "Time from a request's arrival (queueing included) to its first generated token",
            Unit::Seconds,
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "decode_tokens_per_second",
            "Decode speed of the last finished generation",
            metrics.decode_tokens_per_second.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Generations running on the engine",
            metrics.in_flight.clone(),
        );
        registry.register(
            "requests_queued",
            "Generations waiting for the engine",
            metrics.queued.clone(),
        );
        registry.register(
            "requests_cancelled",
            "Generations stopped early because the client went away or stopped reading",
            metrics.cancelled.clone(),
        );
        registry.register(
            "requests_rejected",
            "Generations refused with 429 because the queue for the engine was full",
            metrics.rejected.clone(),
        );
        registry.register(
            "prompt_cache_hits",
            "Generations that reused the keys and values of a kept prompt prefix",
            metrics.prompt_cache_hits.clone(),
        );
        registry.register(
            "prompt_cache_reused_tokens",
            "Prompt tokens not computed because a kept prefix held them (included in prompt_tokens)",
            metrics.prompt_cache_reused_tokens.clone(),
        );
        registry.register_with_unit(
            "prompt_cache",
            "Keys and values kept for reuse by later prompts",
            Unit::Bytes,
            metrics.prompt_cache_bytes.clone(),
        );
        registry.register(
            "draft_tokens",
            "Tokens drafted (--lookup, --model-draft) and verified",
            metrics.draft_tokens.clone(),
        );
        registry.register(
            "draft_accepted_tokens",
            "Drafted tokens the model drew too, and so kept",
            metrics.draft_accepted_tokens.clone(),
        );
        registry.register_collector(Box::new(BatchCollector(metrics.batches.clone())));
        registry.register_collector(Box::new(WeightCollector(metrics.weights.clone())));
        (metrics, registry)
    }

    pub(crate) fn record_request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Token counts and decode speed of one generation, finished or not.
    pub(crate) fn record_generation(
        &self,
        prompt_tokens: usize,
        cached_tokens: usize,
        generated_tokens: usize,
        decode: Duration,
    ) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        if cached_tokens > 0 {
            self.prompt_cache_hits.inc();
            self.prompt_cache_reused_tokens.inc_by(cached_tokens as u64);
        }
        self.generated_tokens.inc_by(generated_tokens as u64);
        self.decode_seconds.inc_by(decode.as_secs_f64());
        // The first token comes out of the prompt pass; decode speed is the rest.
        let decoded = generated_tokens.saturating_sub(1);
        if decoded > 0 && !decode.is_zero() {
            self.decode_tokens_per_second
                .set(decoded as f64 / decode.as_secs_f64());
        }
    }
}

/// Increments a gauge now and decrements it when dropped, so a cancelled future or a
/// panicking task cannot leave it counting.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The pipeline's batch counts as metrics: `stage_batches_total` and the others below.
#[derive(Debug)]
struct BatchCollector(BatchStats);

impl Collector for BatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.counts();
        let counters = [
            (
                "stage_batches",
                "Passes of a pipeline stage on this node (its own first stage as a head, the \
                 stages it serves), each over one session or more",
                c.batches,
            ),
            (
                "stage_batch_sessions",
                "Session steps run in those passes (divided by stage_batches: sessions per pass)",
                c.sessions,
            ),
            ("stage_batch_rows", "Token rows run in those passes", c.rows),
            (
                "stage_batches_shared",
                "Passes that ran two sessions or more at once",
                c.shared,
            ),
        ];
        encode_counters(&mut encoder, None, &counters)?;
        let largest = ConstGauge::new(i64::try_from(c.largest).unwrap_or(i64::MAX));
        largest.encode(encoder.encode_descriptor(
            "stage_batch_sessions_max",
            "The most sessions run in one pass",
            None,
            largest.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The bytes of weights moved over the LAN as metrics: `weights_sent_bytes_total` and the
/// others below.
#[derive(Debug)]
struct WeightCollector(WeightStats);

impl Collector for WeightCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.counts();
        let counters = [
            (
                "weights_sent",
                "Bytes of stage files this node sent members that lacked the layers",
                c.sent,
            ),
            (
                "weights_received",
                "Bytes of stage files this node received from members (transfers cut short too)",
                c.received,
            ),
            (
                "weights_reused",
                "Bytes of stage files fetched whole that this node copied from a stage file it \
                 kept (a share that grew) instead of receiving them",
                c.reused,
            ),
        ];
        encode_counters(&mut encoder, Some(&Unit::Bytes), &counters)
    }
}

/// Counters read at a scrape, as `(name, help, value)`, all in `unit`.
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    unit: Option<&Unit>,
    counters: &[(&str, &str, u64)],
) -> Result<(), std::fmt::Error> {
    for &(name, help, value) in counters {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, unit, counter.metric_type())?)?;
    }
    Ok(())
}
