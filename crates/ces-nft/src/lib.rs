//! The CES nftables backend: the policy model rendered as one private table ([`render`]) and loaded atomically by
//! the `nft` command ([`apply`]). The meaning is docs/semantics.md; the layout is docs/nft.md.

pub mod apply;
pub mod conntrack;
pub mod dns;
pub mod flows;
pub mod intervals;
pub mod netlink;
pub mod nflog;
pub mod nfqueue;
mod nl;
mod render;
pub mod tags;

pub use render::{
    AnswerTenants, CT_MARK_MASK, Chain, DnsHook, DnsQueue, Existing, LearnedSet, LogTag, NftSet, RenderError, Ruleset,
    SetKind, ShapeClass, is_learned_set_name, learned_set_name, render, render_tagged, render_with, set_update,
};

/// The gateway as a backend of the sync loop: renders the model as of now and applies it.
pub struct NftBackend {
    pub applier: apply::Applier,
    /// The warnings of the last render, so that the agent reports them when they change.
    pub last_warnings: Vec<ces_model::Diagnostic>,
    /// The tag ids of the table (and of tags that left it), shared with the flow readers.
    pub tags: std::sync::Arc<std::sync::RwLock<tags::TagIds>>,
    /// Where the tag ids are kept across restarts (in the flow store's folder).
    pub tags_file: Option<std::path::PathBuf>,
    /// The NFLOG group the applied table logs to (`u32::MAX` before the first apply), for the NFLOG reader.
    pub log_group: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The flow pipeline: told the pods and rules of every applied model.
    pub flows: Option<std::sync::Arc<ces_flow::pipeline::Pipeline>>,
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
            tags: Default::default(),
            tags_file: None,
            log_group: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(u32::MAX)),
            flows: None,
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
        let rs = {
            let mut ids = self.tags.write().unwrap_or_else(|p| p.into_inner());
            let rs =
                render_tagged(model, jiff::Timestamp::now(), self.dns_hook, &mut ids).map_err(|e| e.to_string())?;
            if let Some(f) = &self.tags_file
                && let Err(e) = ids.save(f)
            {
                eprintln!("ces gateway: keeping the rules' ids in {}: {e}", f.display());
            }
            rs
        };
        if let Some(d) = &self.dns {
            d.want_queue(&rs, &model.settings.gateway.dns);
        }
        // The pods' history first: a connection the new table lets through is never older than its pod's entry.
        if let Some(f) = &self.flows {
            f.policy(model);
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
        self.log_group.store(model.settings.gateway.log_group as u32, std::sync::atomic::Ordering::Relaxed);
        let mut summary = match applied {
            apply::Applied::Replaced => match &self.applier.replaced_for {
                Some(why) => format!("table inet {} replaced ({why})", rs.table),
                None => format!("table inet {} replaced", rs.table),
            },
            apply::Applied::Updated(n) => format!("table inet {}: elements of {n} set(s) updated", rs.table),
            apply::Applied::Unchanged => format!("table inet {} unchanged", rs.table),
        };
        let mut rs = rs;
        rs.diagnostics.extend(egress_not_local(model));
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
        // The pods' history changes as of now, before the kernel does: a connection the new elements let through
        // is attributed to the pod that now has the address.
        if let Some(f) = &self.flows {
            f.send(ces_flow::pipeline::Input::PodChanges(delta.pods.clone(), jiff::Timestamp::now()));
        }
        let applied = self.applier.apply_sets(sets).map_err(|e| e.to_string())?;
        let summary = match applied {
            apply::Applied::Updated(n) => format!("table inet {table}: elements of {n} set(s) updated (pod churn)"),
            _ => format!("table inet {table} unchanged (pod churn)"),
        };
        Ok(ces_sync::Applied { summary, valid_until })
    }
}

/// Egress addresses of ExternalIPRules that are no address of this host (in the agent's network namespace): replies
/// to them reach the gateway only if the network routes them here, so the agent says so (a warning on the rule).
fn egress_not_local(model: &ces_model::PolicyModel) -> Vec<ces_model::Diagnostic> {
    let mut out = Vec::new();
    for nat in model.tenants.iter().flat_map(|t| &t.nat_rules) {
        for a in &nat.external_addresses {
            let ip = match a {
                ces_model::AddressEntry::Net(n) => n.addr(),
                ces_model::AddressEntry::Range(x, _) => *x,
                _ => continue,
            };
            // Binding succeeds only to an address of this host (or with ip_nonlocal_bind, which then vouches).
            if let Err(e) = std::net::UdpSocket::bind((ip, 0))
                && e.kind() == std::io::ErrorKind::AddrNotAvailable
            {
                out.push(ces_model::Diagnostic {
                    severity: ces_model::Severity::Warning,
                    object: Some(ces_model::ObjectRef::new("ExternalIPRule", Some(&nat.namespace), &nat.name)),
                    origin: None,
                    reason: "EgressAddressNotLocal".into(),
                    message: format!(
                        "egress address {a} is not an address of this gateway: replies reach it only if the network routes it here"
                    ),
                });
            }
        }
    }
    out
}
