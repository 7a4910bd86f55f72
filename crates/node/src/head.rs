//! A pipeline head: the ring it plans (or is told), connects and answers through, and how
//! it follows the cluster's members — and, with `--model auto`, picks the model for them
//! ([`crate::auto_model`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use shoal_api::AppState;
use shoal_cluster::Roster;
use shoal_pipeline::{Pipeline, Replan, RingPlanner};
use shoal_wire::Transport;
use tokio::task::JoinHandle;

use crate::membership;

/// How often a head that plans over the members looks for members that joined.
pub(crate) const FOLLOW_PERIOD: Duration = Duration::from_secs(2);

/// The longest a head waits before it tries again to set up a ring of given peers.
const MOST_BETWEEN_TRIES: Duration = Duration::from_secs(30);

/// How long a head waits after its `failures`-th failed try to set up a ring of given
/// peers (1 s, doubling, at most [`MOST_BETWEEN_TRIES`]): a peer that is still starting
/// or restarting is there within seconds, one that is down costs a try every 30 s.
fn retry_after(failures: u32) -> Duration {
    let doubled = 1u64 << failures.saturating_sub(1).min(16);
    Duration::from_secs(doubled).min(MOST_BETWEEN_TRIES)
}

/// A pipeline head's ring, before it is connected.
pub(crate) struct PipelineHead {
    /// The model (with `--model auto`, only where the models directory is).
    pub(crate) model: PathBuf,
    /// `auto`, or layers per stage.
    pub(crate) split: String,
    pub(crate) peers: Vec<String>,
    /// The members: with `auto` and no `peers`, the ring is planned over those found.
    pub(crate) roster: Arc<Roster>,
    pub(crate) activations: shoal_wire::DType,
    pub(crate) node_id: String,
    /// Memory this node offers to an `auto` plan, if capped below what is free.
    pub(crate) memory_cap: Option<u64>,
    /// How the stages are reached (the swarm key).
    pub(crate) transport: Transport,
    /// The head's prompt cache.
    pub(crate) prompt_cache_bytes: usize,
    /// Guessing ahead (`--lookup`, `--model-draft`), verified by the ring.
    pub(crate) speculation: Option<shoal_engine::Speculation>,
    /// The draft model's file (`--model-draft`), loaded whole on the head.
    pub(crate) model_draft: Option<PathBuf>,
    /// The chat template used instead of the model's own (`--chat-template-file`).
    pub(crate) chat_template: Option<String>,
    /// How embeddings are pooled, instead of as the model file says (`--pooling`).
    pub(crate) pooling: Option<shoal_engine::Pooling>,
    /// Where the ring goes once connected, so members see the head's own layers.
    pub(crate) ring: membership::HeadRing,
    /// Where the weights the head sends stages are counted (the node's metrics).
    pub(crate) weight_stats: shoal_pipeline::WeightStats,
}

/// Where a ring's layers go: the head's range first, then each peer's in ring order.
pub(crate) struct Layout {
    pub(crate) ranges: Vec<std::ops::Range<usize>>,
    pub(crate) peers: Vec<String>,
    /// With `auto`: the planner (it re-plans after a loss) and its plan.
    pub(crate) planned: Option<(Arc<RingPlanner>, shoal_cluster::Plan)>,
}

impl PipelineHead {
    /// Plans the ring (`auto`) or checks the given split, loads only the first stage, sets
    /// up the peers' stages, then answers through the ring.
    ///
    /// Planned over the members found (`auto`, no `--peer`), the ring follows the cluster:
    /// a plan that cannot be made yet (too little memory among the members so far) is
    /// tried again when members join, and a member that joins a running ring is offered
    /// to the planner, which moves the ring onto it from the next request on when that is
    /// better (the planner still keeps the model on one device when it fits there and that
    /// is fastest).
    ///
    /// Over given peers (`--peer`), a ring that cannot be set up — a peer not up yet, one
    /// that restarted while it loaded its layers, one that could not get its weights — is
    /// tried again, after 1 s and then twice as long each time (at most 30 s), and
    /// `/health` and every request say why meanwhile (a peer with another swarm key too:
    /// its key may be changed). What trying again cannot mend fails for good: a split that
    /// does not fit the model or the peers, a `--peer` that is not `HOST:PORT`, and faults
    /// of this node's own (its model file, its stage, the draft model, the chat template).
    pub(crate) fn start(self, state: AppState) -> JoinHandle<()> {
        tokio::spawn(async move {
            let follows = self.split.trim() == "auto" && self.peers.is_empty();
            let mut failures = 0;
            loop {
                let connected = match self.layout(&self.model, None).await {
                    Ok(layout) => self.connect(&self.model, layout, &state).await,
                    Err(e) => Err(e),
                };
                match connected {
                    Ok((pipeline, planner)) => {
                        state.set_model_file(self.model.clone());
                        state.set_ready(pipeline.clone());
                        self.show(&self.model, &pipeline);
                        if let Some(planner) = planner.filter(|_| follows) {
                            follow_members(&self.roster, &pipeline, &planner).await;
                        }
                        return;
                    }
                    Err(e) if e.local => {
                        tracing::error!("{e}");
                        state.set_failed(e.message);
                        return;
                    }
                    Err(e) if follows => {
                        let known = membership::alive_peers(&self.roster);
                        let message = format!("{e}; planning again when a member joins");
                        tracing::warn!("{message}");
                        state.set_waiting(message);
                        membership::member_joins(&self.roster, &known).await;
                    }
                    Err(e) => {
                        failures += 1;
                        let wait = retry_after(failures);
                        let message = format!("{e}; trying again in {} s", wait.as_secs().max(1));
                        tracing::warn!("{message}");
                        state.set_waiting(message);
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        })
    }

    /// Members see `pipeline` as the ring this node heads, of `model`.
    pub(crate) fn show(&self, model: &Path, pipeline: &Arc<Pipeline>) {
        *self.ring.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((file_name(model), pipeline.clone()));
    }

    /// Where `model`'s layers go: planned over the peers (`auto`; the `--peer`s, else
    /// `candidates`, else the members found), or as the split says.
    pub(crate) async fn layout(
        &self,
        model: &Path,
        candidates: Option<Vec<String>>,
    ) -> Result<Layout, SetupFailed> {
        if self.split.trim() != "auto" {
            // A split given that does not fit will not fit later either: local.
            let n_layers = shoal_engine::GgufFile::open(model)
                .map_err(|e| SetupFailed::local(e.to_string()))?
                .config()
                .n_layers;
            let ranges = shoal_pipeline::check_split(&self.split, self.peers.len(), n_layers)
                .map_err(|e| SetupFailed::local(e.to_string()))?;
            return Ok(Layout {
                ranges,
                peers: self.peers.clone(),
                planned: None,
            });
        }
        let candidates = match candidates {
            Some(given) => given,
            None if !self.peers.is_empty() => self.peers.clone(),
            None => {
                let found = membership::discovered_peers(&self.roster).await;
                tracing::info!(
                    "planning {} over the members found: {found:?} and this node",
                    file_name(model)
                );
                found
            }
        };
        let planned = shoal_pipeline::plan_ring(
            model,
            &candidates,
            &self.node_id,
            self.memory_cap,
            &self.transport,
            &self.weight_stats,
        )
        .await
        .map_err(|e| SetupFailed {
            message: e.to_string(),
            local: e.is_local(),
        })?;
        Ok(Layout {
            ranges: planned.ranges,
            peers: planned.peers,
            planned: Some((Arc::new(planned.planner), planned.plan)),
        })
    }

    /// Loads the head's stage of `model` and sets up the peers' as `layout` says.
    pub(crate) async fn connect(
        &self,
        model: &Path,
        layout: Layout,
        state: &AppState,
    ) -> Result<(Arc<Pipeline>, Option<Arc<RingPlanner>>), SetupFailed> {
        let shown: Vec<String> = layout
            .ranges
            .iter()
            .map(|r| format!("{}-{}", r.start, r.end.saturating_sub(1)))
            .collect();
        let planner = layout.planned.map(|(planner, _)| planner);
        let draft_model = match self.model_draft.clone() {
            Some(path) if self.speculation.is_some_and(|s| s.draft_model) => {
                let loaded = tokio::task::spawn_blocking(move || crate::load_model(&path))
                    .await
                    .map_err(|e| format!("loading the draft model: {e}"))
                    .and_then(|loaded| loaded)
                    .map_err(SetupFailed::local)?;
                Some(Arc::new(loaded))
            }
            _ => None,
        };
        let settings = shoal_pipeline::RingSettings {
            activations: self.activations,
            stats: state.batch_stats(),
            weight_stats: self.weight_stats.clone(),
            replan: planner.clone().map(|p| p as Arc<dyn Replan>),
            transport: self.transport.clone(),
            prompt_cache_bytes: self.prompt_cache_bytes,
            speculation: self.speculation,
            draft_model,
            chat_template: self.chat_template.clone(),
            pooling: self.pooling,
            weight_holders: {
                let (roster, model, ring) =
                    (self.roster.clone(), file_name(model), layout.peers.clone());
                shoal_pipeline::WeightHolders::new(move || {
                    membership::holders_of(&roster, &model, &ring)
                })
            },
        };
        let peers = layout.peers;
        let pipeline = shoal_pipeline::connect_ring(model, &peers, &layout.ranges, settings)
            .await
            .map_err(|e| SetupFailed {
                message: format!("setting up the ring of stages: {e}"),
                local: e.is_local(),
            })?;
        tracing::info!(
            "pipeline ready: {} of {} over this node and {peers:?}",
            shown.join(","),
            file_name(model)
        );
        Ok((Arc::new(pipeline), planner))
    }
}

/// Why a ring could not be set up.
#[derive(Debug)]
pub(crate) struct SetupFailed {
    pub(crate) message: String,
    /// The fault is this node's own (its model file, its stage, its settings), not a
    /// peer's or a link's: trying again cannot mend it.
    pub(crate) local: bool,
}

impl SetupFailed {
    fn local(message: String) -> SetupFailed {
        SetupFailed {
            message,
            local: true,
        }
    }
}

impl std::fmt::Display for SetupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A model's file name (what peers are asked for).
pub(crate) fn file_name(model: &Path) -> String {
    model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Offers every member that joins to the ring's planner and re-plans, for as long as the
/// node runs (the task ends with the node).
async fn follow_members(roster: &Roster, pipeline: &Pipeline, planner: &RingPlanner) {
    let mut tick = tokio::time::interval(FOLLOW_PERIOD);
    loop {
        tick.tick().await;
        let joined = planner.add_candidates(&membership::alive_peers(roster));
        if !joined.is_empty() {
            replan(pipeline, &joined).await;
        }
    }
}

/// Re-plans `pipeline` once members `joined` are among the planner's candidates.
pub(crate) async fn replan(pipeline: &Pipeline, joined: &[std::net::SocketAddr]) {
    match pipeline.replan().await {
        Ok(true) => {
            let (head, peers) = pipeline.layout();
            tracing::info!(
                ?joined,
                ?head,
                ?peers,
                "members joined: the ring moved to a new plan"
            );
        }
        Ok(false) => tracing::info!(?joined, "members joined: the ring keeps its plan"),
        Err(e) => tracing::warn!(?joined, error = %e, "members joined, but re-planning failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_again_after_one_second_then_twice_as_long_up_to_thirty() {
        let waits: Vec<u64> = (1..=8).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_after(u32::MAX), MOST_BETWEEN_TRIES);
    }
}
