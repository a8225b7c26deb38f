//! The store's counters (`lazyblk_store_*`) and the template center's gauges, set at
//! each scrape.

use axum::extract::State;
use axum::response::Response;

use super::center::enrich;
use super::counters::{ReplicaLabels, TemplateOnly};
use super::state::AppState;

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let live = state.nodes.live();
    let fleet = &state.metrics.fleet;
    fleet.live_nodes.set(live.len() as i64);
    fleet.replicas.clear();
    for n in &live {
        for r in &n.replicas {
            fleet
                .replicas
                .get_or_create(&ReplicaLabels {
                    template: r.template.clone(),
                    phase: r.phase.as_str().to_string(),
                })
                .inc();
        }
    }
    fleet.wanted.clear();
    // A scrape while the bucket does not answer shows what it can.
    for w in state.center.wishes().await.unwrap_or_default() {
        let wanted = state
            .center
            .counts(&w.template, &live)
            .await
            .map_or(0, |c| c.wanted);
        fleet
            .wanted
            .get_or_create(&TemplateOnly {
                template: w.template,
            })
            .set(wanted as i64);
    }
    let policy = state.center.policy().await.unwrap_or_default();
    fleet.stale.clear();
    if !policy.is_empty() {
        if let Ok(mut list) = state.backend.list().await {
            for t in &mut list {
                let _ = enrich(&state, t, &live, &policy).await;
                fleet
                    .stale
                    .get_or_create(&TemplateOnly {
                        template: t.template.clone(),
                    })
                    .set(i64::from(t.stale));
            }
        }
    }
    crate::metrics::response(&state.metrics.registry)
}
