//! The CES nftables backend: the policy model rendered as one private table ([`render`]) and loaded atomically by
//! the `nft` command ([`apply`]). The meaning is docs/semantics.md; the layout is docs/nft.md.

pub mod apply;
pub mod dns;
pub mod intervals;
pub mod netlink;
pub mod nflog;
pub mod nfqueue;
mod nl;
mod render;

pub use render::{
    AnswerTenants, CT_MARK_MASK, Chain, DnsHook, DnsQueue, Existing, LearnedSet, LogTag, NftSet, RenderError, Ruleset,
    SetKind, ShapeClass, is_learned_set_name, learned_set_name, render, render_with, set_update,
};

/// The gateway as a backend of the sync loop: renders the model as of now and applies it.
pub struct NftBackend {
    pub applier: apply::Applier,
    /// The warnings of the last render, so that the agent reports them when they change.
    pub last_warnings: Vec<ces_model::Diagnostic>,
    /// Kept up to date for the log reader: the tags and pods of what is applied.
    pub log_index: std::sync::Arc<std::sync::Mutex<nflog::LogIndex>>,
    /// How host names are learned (`Off`: not at all).
    pub dns_hook: DnsHook,
    /// The learning of host names' addresses, shared with the thread that holds DNS answers.
    pub dns: Option<std::sync::Arc<dns::Dns>>,
    /// The iptables-nft hook installed last (for `DnsHook::External`).
    external_hook: Option<Option<DnsQueue>>,
}

impl NftBackend {
    /// A backend that learns no host names (their entries are reported as not enforced).
    pub fn new(nft: apply::Nft) -> NftBackend {
        NftBackend {
            applier: apply::Applier::new(nft),
            last_warnings: Vec::new(),
            log_index: Default::default(),
            dns_hook: DnsHook::Off,
            dns: None,
            external_hook: None,
        }
    }

    /// A backend that learns host names through `hook` (what the kernel offers: [`apply::Nft::supports_queue`]);
    /// the caller runs [`dns::Dns::run`] on a thread.
    pub fn with_dns(nft: apply::Nft, hook: DnsHook, settings: &ces_model::DnsSettings) -> NftBackend {
        let mut b = NftBackend::new(nft);
        b.dns_hook = hook;
        b.dns = (hook != DnsHook::Off).then(|| dns::Dns::new(settings));
        b
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
        let rs = render_with(model, jiff::Timestamp::now(), self.dns_hook).map_err(|e| e.to_string())?;
        if let Some(d) = &self.dns {
            d.want_queue(&rs, &model.settings.gateway.dns);
        }
        let applied = self.applier.apply(&rs, full).map_err(|e| e.to_string())?;
        if self.dns_hook == DnsHook::External {
            let want = rs.dns_queue;
            if full || self.external_hook != Some(want) {
                self.external_hook = None;
                self.applier.nft.external_dns_hook(&rs.table, want).map_err(|e| e.to_string())?;
                self.external_hook = Some(want);
            }
        }
        if let Some(d) = &self.dns {
            d.applied(&rs, &model.settings.gateway.dns, &self.applier.nft)?;
        }
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
