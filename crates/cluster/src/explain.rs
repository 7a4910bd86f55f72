//! A plan in words: what runs where, what it costs, and why nodes are left out.

use std::fmt;

use crate::types::{LeftOut, LeftOutReason, Objective, Plan, Prediction, Search};

/// `1.50 GiB`, `512.0 MiB`, `12.0 KiB`, `100 B`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

fn same_ms(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn signed_ms(x: f64) -> String {
    if x >= 0.0 {
        format!("+{x:.2} ms")
    } else {
        format!("−{:.2} ms", -x)
    }
}

impl Plan {
    /// The plan in lines a person can read: the objective and how the plan was found,
    /// one line per stage (node, layers, memory used of free, compute, hop), one line
    /// per node left out with the reason, then the predicted totals.
    pub fn explain(&self) -> Vec<String> {
        let mut lines = Vec::new();
        lines.push(match self.objective {
            Some(Objective::Latency) => {
                "objective: lowest time per token for one stream (stage compute + hops around the ring)".to_string()
            }
            Some(Objective::Throughput) => {
                "objective: most tokens/s for many streams (lowest slowest stage; ties by time per token)".to_string()
            }
            None => "forced split: checked against the same limits and costed with the same model".to_string(),
        });
        lines.push(match self.search {
            Search::Exact { peers, rings } => format!(
                "search: exact — every ring over {peers} usable peer{} ({rings} rings tried)",
                if peers == 1 { "" } else { "s" }
            ),
            Search::Heuristic { nodes, rings } => format!(
                "search: heuristic — {nodes} nodes is too many to try every ring; exact over shortlists, then local search ({rings} rings tried); valid, not proven optimal"
            ),
            Search::Forced => "search: none (split given by the user)".to_string(),
        });

        let head_id = self
            .stages
            .first()
            .map(|s| s.node_id.as_str())
            .unwrap_or("");
        let k = self.stages.len();
        for (i, s) in self.stages.iter().enumerate() {
            let role = match (i == 0, i + 1 == k) {
                (true, true) => "head: embedding, all layers, LM head",
                (true, false) => "head: embedding",
                (false, true) => "last: LM head, samples",
                (false, false) => "middle",
            };
            let hop = if k == 1 {
                "no hops".to_string()
            } else if i + 1 == k {
                format!("token back to `{head_id}` {:.2} ms", s.hop_ms)
            } else {
                format!("→ `{}` {:.2} ms", self.stages[i + 1].node_id, s.hop_ms)
            };
            lines.push(format!(
                "stage {i}: `{}` (node {}, {role})  layers {}-{} ({})  memory {} of {} free  compute {:.2} ms  {hop}",
                s.node_id,
                s.node,
                s.layers.start,
                s.layers.end.saturating_sub(1),
                s.n_layers(),
                human_bytes(s.memory_bytes),
                human_bytes(s.free_memory_bytes),
                s.compute_ms,
            ));
        }

        for l in &self.left_out {
            lines.push(format!(
                "left out `{}` (node {}): {}",
                l.node_id,
                l.node,
                self.why(l)
            ));
        }

        let tps_one = if self.predicted_decode_ms_per_token > 0.0 {
            1000.0 / self.predicted_decode_ms_per_token
        } else {
            f64::INFINITY
        };
        lines.push(format!(
            "predicted: {:.2} ms/token for one stream (compute {:.2} ms + {} hops {:.2} ms) ≈ {:.1} tokens/s",
            self.predicted_decode_ms_per_token,
            self.compute_ms,
            if k == 1 { 0 } else { k },
            self.hop_ms,
            tps_one,
        ));
        let slowest = self
            .stages
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.stage_ms().total_cmp(&b.1.stage_ms()));
        if let Some((i, s)) = slowest {
            lines.push(format!(
                "many streams: slowest stage {:.2} ms (stage {i} on `{}`) → ≈ {:.1} tokens/s",
                self.predicted_bottleneck_ms, s.node_id, self.predicted_throughput_tokens_per_s
            ));
        }
        lines.push(format!(
            "prefill: ≈ {:.2} ms of compute per prompt token (stages in sequence; chunking overlaps them)",
            self.predicted_prefill_ms_per_token
        ));
        lines.push(format!("split: --split {}", self.split_string()));
        lines
    }

    fn why(&self, l: &LeftOut) -> String {
        match &l.reason {
            LeftOutReason::NoMemory {
                free_bytes,
                needed_bytes,
            } => format!(
                "not enough memory: {} free, one layer with its KV reserve needs {}",
                human_bytes(*free_bytes),
                human_bytes(*needed_bytes)
            ),
            LeftOutReason::NoRoom => format!(
                "no valid ring includes it (the model has {} layers, every stage needs one, and the memory limits leave no ring with it)",
                self.n_layers
            ),
            LeftOutReason::NotInSplit => "not in the forced split".to_string(),
            LeftOutReason::NotBetter { with, chosen } => match self.objective {
                Some(Objective::Throughput) => why_throughput(with, chosen),
                _ => why_latency(with, chosen),
            },
        }
    }
}

fn why_latency(with: &Prediction, chosen: &Prediction) -> String {
    let extra_hops = with.hop_ms - chosen.hop_ms;
    let saved = chosen.compute_ms - with.compute_ms;
    if same_ms(with.decode_ms_per_token, chosen.decode_ms_per_token) {
        format!(
            "would not be faster ({:.2} ms/token either way); fewer stages preferred",
            chosen.decode_ms_per_token
        )
    } else if extra_hops >= 0.0 && saved >= 0.0 {
        format!(
            "adding it would add {extra_hops:.2} ms of hops but save only {saved:.2} ms of compute (best plan with it: {:.2} ms/token vs {:.2})",
            with.decode_ms_per_token, chosen.decode_ms_per_token
        )
    } else {
        format!(
            "the best plan with it predicts {:.2} ms/token vs {:.2} (compute {}, hops {})",
            with.decode_ms_per_token,
            chosen.decode_ms_per_token,
            signed_ms(-saved),
            signed_ms(extra_hops)
        )
    }
}

fn why_throughput(with: &Prediction, chosen: &Prediction) -> String {
    if same_ms(with.bottleneck_ms, chosen.bottleneck_ms) {
        format!(
            "would not lower the slowest stage ({:.2} ms either way); time per token with it {:.2} ms vs {:.2}",
            chosen.bottleneck_ms, with.decode_ms_per_token, chosen.decode_ms_per_token
        )
    } else {
        format!(
            "the best plan with it has a slowest stage of {:.2} ms vs {:.2} (≈ {:.1} vs {:.1} tokens/s; hops {})",
            with.bottleneck_ms,
            chosen.bottleneck_ms,
            1000.0 / with.bottleneck_ms,
            1000.0 / chosen.bottleneck_ms,
            signed_ms(with.hop_ms - chosen.hop_ms)
        )
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.explain() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}
