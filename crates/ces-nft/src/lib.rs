//! The CES nftables backend: the policy model rendered as one private table ([`render`]) and loaded atomically by
//! the `nft` command ([`apply`]). The meaning is docs/semantics.md; the layout is docs/nft.md.

pub mod apply;
pub mod intervals;
pub mod netlink;
pub mod nflog;
mod nl;
mod render;

pub use render::{
    CT_MARK_MASK, Chain, Existing, LogTag, NftSet, RenderError, Ruleset, SetKind, ShapeClass, render, set_update,
};

/// The gateway as a backend of the sync loop: renders the model as of now and applies it.
pub struct NftBackend {
    pub applier: apply::Applier,
    /// The warnings of the last render, so that the agent reports them when they change.
    pub last_warnings: Vec<ces_model::Diagnostic>,
    /// Kept up to date for the log reader: the tags and pods of what is applied.
    pub log_index: std::sync::Arc<std::sync::Mutex<nflog::LogIndex>>,
}

impl NftBackend {
    pub fn new(nft: apply::Nft) -> NftBackend {
        NftBackend { applier: apply::Applier::new(nft), last_warnings: Vec::new(), log_index: Default::default() }
    }
}

impl ces_sync::Backend for NftBackend {
    fn name(&self) -> &str {
        "nft"
    }

    fn problems(&self) -> Vec<ces_model::Diagnostic> {
        self.last_warnings.clone()
    }

    fn apply(&mut self, model: &ces_model::PolicyModel, full: bool) -> Result<ces_sync::Applied, String> {
        let rs = render(model, jiff::Timestamp::now()).map_err(|e| e.to_string())?;
        let applied = self.applier.apply(&rs, full).map_err(|e| e.to_string())?;
        *self.log_index.lock().unwrap_or_else(|p| p.into_inner()) = nflog::LogIndex::new(model, &rs);
        let mut summary = match applied {
            apply::Applied::Replaced => format!("table inet {} replaced", rs.table),
            apply::Applied::Updated(n) => format!("table inet {}: elements of {n} set(s) updated", rs.table),
            apply::Applied::Unchanged => format!("table inet {} unchanged", rs.table),
        };
        if rs.diagnostics != self.last_warnings {
            for d in &rs.diagnostics {
                summary.push_str(&format!("\n  {d}"));
            }
            self.last_warnings = rs.diagnostics.clone();
        }
        Ok(ces_sync::Applied { summary, valid_until: rs.valid_until })
    }

    /// Pod churn: re-renders only the source sets built from the sets that moved, and updates their elements. A
    /// tenant told apart by address whose members moved changes the tenants map and its overlap check: that takes
    /// the whole render.
    fn apply_pods(
        &mut self,
        model: &ces_model::PolicyModel,
        delta: &ces_model::PodDelta,
    ) -> Result<ces_sync::Applied, String> {
        let by_address =
            model.tenants.iter().any(|t| t.backend.gateway_interfaces.is_empty() && delta.sets.contains(&t.members));
        let Some(last) = self.applier.last().filter(|_| !by_address) else { return self.apply(model, false) };
        let (table, valid_until) = (last.table.clone(), last.valid_until);
        let sets = last
            .sources
            .iter()
            .filter(|(_, names)| names.iter().any(|n| delta.sets.contains(n)))
            .flat_map(|(stem, names)| render::source_sets(model, stem, names))
            .collect();
        let applied = self.applier.apply_sets(sets).map_err(|e| e.to_string())?;
        {
            let mut index = self.log_index.lock().unwrap_or_else(|p| p.into_inner());
            for (before, after) in &delta.pods {
                if let Some(b) = before {
                    index.pods.remove(b);
                }
                if let Some(a) = after {
                    index.pods.insert(a);
                }
            }
        }
        let summary = match applied {
            apply::Applied::Updated(n) => format!("table inet {table}: elements of {n} set(s) updated (pod churn)"),
            _ => format!("table inet {table} unchanged (pod churn)"),
        };
        Ok(ces_sync::Applied { summary, valid_until })
    }
}
