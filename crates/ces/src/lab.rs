//! `ces lab`: the embedded example on a real nftables gateway in network namespaces, with real packets, each flow's
//! real outcome printed next to `simulate`'s prediction.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use ces_eval::{Evaluator, Flow};
use ces_lab::{Lab, LabSpec, Proto, Side};
use ces_model::{AddressEntry, Destination, PolicyModel, Protocol};
use ces_nft::apply::{Applier, Nft};

use crate::inputs::Inputs;
use crate::{Failure, InputArgs};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

struct Probe {
    side: usize,
    tenant: String,
    who: String,
    from: IpAddr,
    to: IpAddr,
    proto: Proto,
    port: u16,
}

impl Probe {
    fn target(&self) -> String {
        ces_lab::target(self.to, self.proto, self.port)
    }
}

/// Sides: one per tenant interface (its tenant's pods), and one for the tenants found by address (their pods and an
/// address that is nobody's).
fn sides(model: &PolicyModel) -> Vec<(Side, String)> {
    let mut out = Vec::new();
    let mut by_address = Vec::new();
    for t in &model.tenants {
        let ips: Vec<IpAddr> = model.pods.iter().filter(|p| p.tenant == t.name).flat_map(|p| p.ips.clone()).collect();
        match t.backend.gateway_interfaces.first() {
            Some(i) => out.push((Side { gateway_interface: i.clone(), addresses: ips }, t.name.clone())),
            None => by_address.extend(ips.into_iter().map(|ip| (ip, t.name.clone()))),
        }
    }
    by_address.push(("10.99.0.1".parse().unwrap(), "Common".into()));
    let addresses = by_address.iter().map(|(ip, _)| *ip).collect();
    out.push((Side { gateway_interface: "lab0".into(), addresses }, String::new()));
    out
}

/// Flows from every pod to the first address of every IP destination entry, on the entry's first ports.
fn probes(model: &PolicyModel, sides: &[(Side, String)]) -> Vec<Probe> {
    let mut out = Vec::new();
    let mut dests: Vec<(IpAddr, Proto, u16)> = Vec::new();
    for d in model.destination_sets.values() {
        for a in &d.addresses {
            let ip = match a {
                AddressEntry::Net(n) => n.network(),
                AddressEntry::Range(x, _) => *x,
                _ => continue,
            };
            let ports: Vec<(Proto, u16)> = if d.ports.is_empty() {
                vec![(Proto::Tcp, 443)]
            } else {
                d.ports
                    .iter()
                    .map(|p| {
                        let port = p.ports.first().map_or(443, |r| r.start);
                        match p.protocol {
                            Protocol::Udp => (Proto::Udp, port),
                            Protocol::Icmp => (Proto::Icmp, 0),
                            _ => (Proto::Tcp, port),
                        }
                    })
                    .collect()
            };
            dests.extend(ports.into_iter().map(|(proto, port)| (ip, proto, port)));
        }
    }
    dests.push(("93.184.216.34".parse().unwrap(), Proto::Tcp, 80));
    dests.sort_by_key(|d| (d.0, d.2));
    dests.dedup_by_key(|d| (d.0, d.1 as u8, d.2));
    for (i, (side, tenant)) in sides.iter().enumerate() {
        for &from in &side.addresses {
            let tenant = if tenant.is_empty() {
                model.pods.iter().find(|p| p.ips.contains(&from)).map_or("Common".to_string(), |p| p.tenant.clone())
            } else {
                tenant.clone()
            };
            let who = model
                .pods
                .iter()
                .find(|p| p.tenant == tenant && p.ips.contains(&from))
                .map_or(from.to_string(), |p| format!("{}/{}", p.namespace, p.name));
            for &(to, proto, port) in dests.iter().filter(|d| d.0.is_ipv4() == from.is_ipv4()) {
                out.push(Probe { side: i, tenant: tenant.clone(), who: who.clone(), from, to, proto, port });
            }
        }
    }
    out
}

pub fn run(args: &InputArgs) -> Result<(), Failure> {
    let inputs = Inputs::load_unique(args)?;
    let model = inputs.compile();
    let rs = ces_nft::render(&model, jiff::Timestamp::now()).map_err(|e| Failure::input(e.to_string()))?;
    let sides = sides(&model);
    let probes = probes(&model, &sides);
    let servers: BTreeSet<IpAddr> = probes.iter().map(|p| p.to).collect();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let spec = LabSpec {
        prefix: format!("ceslab{}", std::process::id() % 100_000),
        sides: sides.iter().map(|(s, _)| s.clone()).collect(),
        servers: servers.into_iter().collect(),
        sink_ports: Vec::new(),
        tcp_ports: probes
            .iter()
            .filter(|p| p.proto == Proto::Tcp)
            .map(|p| p.port)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        udp_ports: probes
            .iter()
            .filter(|p| p.proto == Proto::Udp)
            .map(|p| p.port)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    eprintln!("ces lab: building {} client side(s), a gateway and a server in network namespaces", spec.sides.len());
    let lab = Lab::build(spec).map_err(|e| Failure { code: 1, message: format!("cannot build the lab: {e}") })?;
    let nft = Nft::in_netns(&lab.gateway);
    Applier::new(nft).apply(&rs, true).map_err(|e| Failure { code: 1, message: e.to_string() })?;
    for d in &rs.diagnostics {
        eprintln!("ces lab: {d}");
    }
    let evaluator = Evaluator::new(&model);
    println!("{:<48} {:<30} {:<58} {:<7} AGREE", "FROM", "TO", "SIMULATE", "NETWORK");
    let (mut agree, mut total) = (0, 0);
    for p in &probes {
        if INTERRUPTED.load(Ordering::Relaxed) {
            eprintln!("ces lab: interrupted; cleaning up");
            drop(lab);
            return Err(Failure { code: 130, message: String::new() });
        }
        let (destination, protocol, port) = ces_eval::parse_target(&p.target()).map_err(Failure::input)?;
        debug_assert!(matches!(destination, Destination::Ip(_)));
        let flow =
            Flow { source: p.from, tenant: p.tenant.clone(), destination, protocol, port, at: jiff::Timestamp::now() };
        let d = evaluator.decide(&flow).map_err(|e| Failure::input(e.to_string()))?;
        let real = lab.probe(p.side, p.from, p.to, p.proto, p.port).map_err(|e| Failure { code: 1, message: e })?;
        let ok = real.as_str() == d.verdict.as_str();
        total += 1;
        agree += ok as usize;
        println!(
            "{:<48} {:<30} {:<58} {:<7} {}",
            format!("{} ({}, {})", p.who, p.from, p.tenant),
            p.target(),
            format!("{} by {}", d.verdict.as_str(), d.decided_by.rule),
            real.as_str(),
            if ok { "yes" } else { "NO" }
        );
    }
    drop(lab);
    println!("{total} flows: {agree} agree, {} differ", total - agree);
    if agree == total { Ok(()) } else { Err(Failure { code: 1, message: String::new() }) }
}
