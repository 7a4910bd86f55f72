//! `--model auto` (issue #15): the head picks the model for the room — the largest known
//! model the members' free memory holds together ([`shoal_models::room`]) for which the
//! planner predicts at least [`AutoModel::min_tokens_per_s`] — and moves up to a bigger
//! one when members join, between requests: it stops taking new ones (503 with
//! `Retry-After`), lets those running finish, sets up the bigger model's ring, and answers
//! with it from then on. When members leave and the planner can no longer place the model
//! on those left, it moves down the same way. Clients send `"model": "auto"` (or the
//! current model's id, which `/v1/models` lists first).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use shoal_api::AppState;
use shoal_models::{FileStatus, ModelInfo};
use shoal_pipeline::{Pipeline, RingPlanner};
use tokio::task::JoinHandle;

use crate::config::AutoModel;
use crate::head::{self, PipelineHead, FOLLOW_PERIOD};
use crate::membership;

/// The model id that always names whichever model the cluster runs.
pub const AUTO_MODEL_ID: &str = "auto";

/// The model the ring runs now.
struct Running {
    model: &'static ModelInfo,
    id: String,
    pipeline: Arc<Pipeline>,
    planner: Option<Arc<RingPlanner>>,
}

/// Picks the model for the members found, then looks at the members every
/// [`FOLLOW_PERIOD`]: when some joined, it moves up to a bigger model if they hold one
/// together, and otherwise offers them to the running ring's planner; when some left and
/// the ring cannot be planned on those left, it moves down.
pub(crate) fn start(head: PipelineHead, auto: AutoModel, state: AppState) -> JoinHandle<()> {
    state.set_model_alias(AUTO_MODEL_ID.to_owned());
    tokio::spawn(async move {
        // The first choice waits for discovery to settle, so that a cluster that is
        // already there starts on the model it holds.
        membership::discovered_peers(&head.roster).await;
        let mut running: Option<Running> = None;
        let mut known: Vec<SocketAddr> = Vec::new();
        let mut first = true;
        let mut tick = tokio::time::interval(FOLLOW_PERIOD);
        loop {
            tick.tick().await;
            let members = head.roster.alive(membership::now());
            let alive: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
            let joined: Vec<SocketAddr> = alive
                .iter()
                .filter(|a| !known.contains(a))
                .copied()
                .collect();
            let left = known.iter().any(|a| !alive.contains(a));
            known = alive.clone();
            if !first && joined.is_empty() && !left {
                continue;
            }
            first = false;
            let mut free: Vec<u64> = vec![membership::offered(
                shoal_pipeline::available_memory_bytes().unwrap_or(0),
                head.memory_cap,
            )];
            free.extend(members.iter().map(|m| m.info.memory_free));
            let fits = shoal_models::room::models_for_room(&free);
            let mut choices: Vec<&'static ModelInfo> = match &running {
                None => fits.clone(),
                Some(r) if !joined.is_empty() => fits
                    .iter()
                    .copied()
                    .filter(|m| m.size > r.model.size)
                    .collect(),
                Some(_) => Vec::new(),
            };
            if let Some(r) = running.as_ref().filter(|_| left && choices.is_empty()) {
                // The planner judges whether the model still runs on the members left.
                if let Err(e) = r.pipeline.replan().await {
                    tracing::warn!(
                        model = %r.id,
                        "members left, and the ring cannot be planned on those left: {e}"
                    );
                    choices = fits.into_iter().filter(|m| m.size < r.model.size).collect();
                }
            }
            let moved = switch(&head, &auto, &state, &choices, &alive, running.as_ref()).await;
            if let Some(next) = moved {
                // The old ring ends here; its stages were taken over by the new one.
                running = Some(next);
                continue;
            }
            match &running {
                Some(r) => {
                    if let Some(planner) = &r.planner {
                        let joined = planner.add_candidates(&alive);
                        if !joined.is_empty() {
                            head::replan(&r.pipeline, &joined).await;
                        }
                    }
                }
                None => {
                    let total: u64 = free.iter().sum();
                    let message = format!(
                        "no known model plans on the {} members found ({:.2} GiB free in all); \
                         choosing again when a member joins",
                        free.len(),
                        total as f64 / (1u64 << 30) as f64
                    );
                    tracing::warn!("{message}");
                    state.set_waiting(message);
                }
            }
        }
    })
}

/// Tries `models` (largest first) on the members at `alive` and this node, and moves to
/// the first that plans fast enough (the last one tried need not be fast, unless it would
/// replace a running model with a bigger one: something must answer). `None` when none
/// did, `running` answering as before.
async fn switch(
    head: &PipelineHead,
    auto: &AutoModel,
    state: &AppState,
    models: &[&'static ModelInfo],
    alive: &[SocketAddr],
    running: Option<&Running>,
) -> Option<Running> {
    let candidates: Vec<String> = alive.iter().map(SocketAddr::to_string).collect();
    let members = alive.len() + 1;
    for (i, &model) in models.iter().enumerate() {
        let path = match find_or_fetch(auto, model).await {
            Ok(path) => path,
            Err(e) => {
                tracing::warn!(model = model.name, "passed over: {e}");
                continue;
            }
        };
        let layout = match head.layout(&path, Some(candidates.clone())).await {
            Ok(layout) => layout,
            Err(e) => {
                tracing::info!(model = model.name, "passed over: it does not plan: {e}");
                continue;
            }
        };
        let predicted = layout.planned.as_ref().map_or(f64::INFINITY, |(_, plan)| {
            1000.0 / plan.predicted_decode_ms_per_token.max(1e-9)
        });
        let up = running.is_some_and(|r| model.size > r.model.size);
        let last_resort = !up && i + 1 == models.len();
        if predicted < auto.min_tokens_per_s && !last_resort {
            tracing::info!(
                model = model.name,
                "passed over: its ring is predicted at {predicted:.1} tokens/s, below the \
                 {:.1} asked for",
                auto.min_tokens_per_s
            );
            continue;
        }
        // Between requests: new ones are told to come back, those running finish.
        let drained = match running {
            Some(r) => {
                let (way, why) = match up {
                    true => ("up", "the nodes here hold it together"),
                    false => ("down", "the nodes left cannot run the bigger one"),
                };
                tracing::info!(from = %r.id, to = model.name, members, "moving {way}: {why}");
                state.set_switching(format!(
                    "moving {way} to {} for the {members} nodes here",
                    model.name
                ));
                state.drain_ring().await
            }
            None => None,
        };
        let id = crate::config::model_id_of(&path);
        match head.connect(&path, layout, state).await {
            Ok((pipeline, planner)) => {
                state.set_model_file(path.clone());
                state.set_ready_as(pipeline.clone(), id.clone());
                head.show(&path, &pipeline);
                tracing::info!(
                    model = %id,
                    members,
                    predicted_tokens_per_s = predicted,
                    "the cluster runs {id}: the largest known model the {members} nodes here \
                     hold together that plans"
                );
                drop(drained);
                return Some(Running {
                    model,
                    id,
                    pipeline,
                    planner,
                });
            }
            Err(e) => {
                tracing::warn!(model = model.name, "could not set up its ring: {e}");
                if let Some(r) = running {
                    // The old ring re-plans itself on its next request if it lost stages.
                    state.set_ready_as(r.pipeline.clone(), r.id.clone());
                    return None;
                }
            }
        }
    }
    None
}

/// The model's file in the models directory, fetched first if it is missing and the node
/// may fetch.
async fn find_or_fetch(auto: &AutoModel, model: &'static ModelInfo) -> Result<PathBuf, String> {
    if model.status_in(&auto.models_dir) == FileStatus::Present {
        return Ok(model.path_in(&auto.models_dir));
    }
    let Some(fetch) = auto.fetch.clone() else {
        return Err(format!(
            "{} is not in {}",
            model.file,
            auto.models_dir.display()
        ));
    };
    tracing::info!(model = model.name, "fetching the model for the room");
    tokio::task::spawn_blocking(move || fetch(model))
        .await
        .map_err(|e| e.to_string())?
}
