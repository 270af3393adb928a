//! `ces lab`: the embedded example on a real nftables gateway in network namespaces, with real packets, each flow's
//! real outcome printed next to `simulate`'s prediction. Host names are served by a real DNS server (dnsmasq) in the
//! server namespace: a flow to a name is resolved from its pod through the gateway, which learns the answer, and
//! then opened to the address at once.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use ces_eval::{Evaluator, Flow};
use ces_lab::{Lab, LabSpec, Proto, Side};
use ces_model::{AddressEntry, PolicyModel, Protocol};
use ces_nft::DnsHook;
use ces_nft::apply::Nft;
use ces_sync::Backend as _;

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
    /// A flow to a host name: resolved first, then opened to the name's address (`to` is the address the lab's DNS
    /// server gives it).
    name: Option<String>,
    proto: Proto,
    port: u16,
}

impl Probe {
    fn target(&self) -> String {
        match &self.name {
            Some(n) => match self.proto {
                Proto::Tcp => format!("{n}:{}/tcp", self.port),
                Proto::Udp => format!("{n}:{}/udp", self.port),
                Proto::Icmp => format!("{n}/icmp"),
            },
            None => ces_lab::target(self.to, self.proto, self.port),
        }
    }
}

/// A host name of the lab's DNS zone: the name, its address, the ports its flows use.
type LabName = (String, IpAddr, Vec<(Proto, u16)>);

/// The ports a probe of a destination uses: the first port of each port entry (443/tcp when it has none).
fn probe_ports(d: &ces_model::DestinationSet) -> Vec<(Proto, u16)> {
    if d.ports.is_empty() {
        return vec![(Proto::Tcp, 443)];
    }
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
}

/// The host names to probe (a wildcard `*.d` as `x.d`), each with its address in the lab's DNS zone and its ports.
fn names(model: &PolicyModel) -> Vec<LabName> {
    let mut out: Vec<LabName> = Vec::new();
    for d in model.destination_sets.values() {
        for a in &d.addresses {
            let name = match a {
                AddressEntry::Host(h) => h.clone(),
                AddressEntry::Wildcard(s) => format!("x.{s}"),
                _ => continue,
            };
            match out.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, ports)) => ports.extend(probe_ports(d)),
                None => {
                    let ip = IpAddr::from([198, 18, 200, out.len() as u8 + 1]);
                    out.push((name, ip, probe_ports(d)));
                }
            }
        }
    }
    for (_, _, ports) in &mut out {
        ports.sort_by_key(|(p, n)| (*p as u8, *n));
        ports.dedup();
    }
    out.truncate(250);
    out
}

/// The resolver the lab's pods ask: the first address of a destination that the policy lets DNS reach (UDP port 53).
fn resolver(model: &PolicyModel) -> Option<IpAddr> {
    model.destination_sets.values().find_map(|d| {
        let dns = d.ports.iter().any(|p| {
            matches!(p.protocol, Protocol::Udp | Protocol::Any) && p.ports.iter().any(|r| r.start <= 53 && 53 <= r.end)
        });
        if !dns {
            return None;
        }
        d.addresses.iter().find_map(|a| match a {
            AddressEntry::Net(n) if n.addr().is_ipv4() => Some(n.network()),
            _ => None,
        })
    })
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

/// Flows from every pod to the first address of every IP destination entry, on the entry's first ports; and from
/// every IPv4 pod address to every host name (the lab's resolver is IPv4).
fn probes(model: &PolicyModel, sides: &[(Side, String)], names: &[LabName]) -> Vec<Probe> {
    let mut out = Vec::new();
    let mut dests: Vec<(IpAddr, Proto, u16)> = Vec::new();
    for d in model.destination_sets.values() {
        for a in &d.addresses {
            let ip = match a {
                AddressEntry::Net(n) => n.network(),
                AddressEntry::Range(x, _) => *x,
                _ => continue,
            };
            dests.extend(probe_ports(d).into_iter().map(|(proto, port)| (ip, proto, port)));
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
                out.push(Probe {
                    side: i,
                    tenant: tenant.clone(),
                    who: who.clone(),
                    from,
                    to,
                    name: None,
                    proto,
                    port,
                });
            }
            for (name, to, ports) in names.iter().filter(|_| from.is_ipv4()) {
                for &(proto, port) in ports {
                    let name = Some(name.clone());
                    out.push(Probe {
                        side: i,
                        tenant: tenant.clone(),
                        who: who.clone(),
                        from,
                        to: *to,
                        name,
                        proto,
                        port,
                    });
                }
            }
        }
    }
    out
}

pub fn run(args: &InputArgs, flow_store: Option<&std::path::Path>) -> Result<(), Failure> {
    let inputs = Inputs::load_unique(args)?;
    let model = inputs.compile();
    let sides = sides(&model);
    let resolver = resolver(&model);
    let names = if resolver.is_some() { names(&model) } else { Vec::new() };
    let probes = probes(&model, &sides, &names);
    let mut servers: BTreeSet<IpAddr> = probes.iter().map(|p| p.to).collect();
    servers.extend(resolver);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let ports = |proto: Proto| -> Vec<u16> {
        probes.iter().filter(|p| p.proto == proto).map(|p| p.port).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let spec = LabSpec {
        prefix: format!("ceslab{}", std::process::id() % 100_000),
        sides: sides.iter().map(|(s, _)| s.clone()).collect(),
        servers: servers.into_iter().collect(),
        sink_ports: Vec::new(),
        tcp_ports: ports(Proto::Tcp),
        udp_ports: ports(Proto::Udp),
        dns: resolver.into_iter().collect(),
    };
    eprintln!("ces lab: building {} client side(s), a gateway and a server in network namespaces", spec.sides.len());
    let mut lab = Lab::build(spec).map_err(|e| Failure { code: 1, message: format!("cannot build the lab: {e}") })?;
    let failed = |message: String| Failure { code: 1, message };
    match resolver {
        Some(r) => {
            let zone = ces_lab::Zone {
                listen: vec![r],
                records: names.iter().map(|(n, ip, _)| (n.clone(), *ip)).collect(),
                cnames: Vec::new(),
                ttl: 300,
            };
            if !names.is_empty() {
                lab.start_dns(&zone).map_err(|e| failed(format!("cannot start the lab's DNS server: {e}")))?;
                eprintln!("ces lab: dnsmasq at {r} answers for {} host name(s)", names.len());
            }
        }
        None => eprintln!("ces lab: no destination lets DNS (UDP port 53) through: host names are not probed"),
    }
    // The gateway agent's backend, with host names learned from the DNS answers crossing the gateway.
    let nft = Nft::in_netns(&lab.gateway);
    let hook = if nft.supports_queue() { DnsHook::Native } else { DnsHook::External };
    let mut backend = ces_nft::NftBackend::with_dns(nft, hook, &model.settings.gateway.dns);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let dns_thread = backend.dns.clone().map(|dns| {
        let (stop, gw) = (stop.clone(), lab.gateway.clone());
        std::thread::spawn(move || dns.run(Some(&gw), &stop))
    });
    // With a flow store: the gateway's flow readers record the lab's traffic.
    let mut recording = None;
    if let Some(dir) = flow_store {
        let writer = ces_flow::store::Writer::open(dir, ces_flow::store::StoreConfig::default()).map_err(failed)?;
        let attributor = ces_flow::attribute::Attributor::new(ces_flow::history::PodHistory::new(3600));
        let pipeline =
            std::sync::Arc::new(ces_flow::pipeline::Pipeline::start(Some(writer), Vec::new(), attributor, 65_536));
        if let Some(dns) = backend.dns.clone() {
            pipeline.send(ces_flow::pipeline::Input::Names(Box::new(move |t, ip| dns.name_of(t, ip))));
        }
        backend.flows = Some(pipeline.clone());
        backend.tags_file = Some(dir.join("gateway-tags.json"));
        let readers = ces_nft::flows::start(
            pipeline.clone(),
            backend.tags.clone(),
            backend.log_group.clone(),
            Some(lab.gateway.clone()),
            stop.clone(),
        );
        recording = Some((pipeline, readers));
    }
    let applied = backend.apply(&model, true).map_err(failed)?;
    eprintln!("ces lab: {}", applied.summary.lines().next().unwrap_or_default());
    for d in &backend.last_warnings {
        eprintln!("ces lab: {d}");
    }
    let evaluator = Evaluator::new(&model);
    println!("{:<48} {:<30} {:<58} {:<7} AGREE", "FROM", "TO", "SIMULATE", "NETWORK");
    let (mut agree, mut total) = (0, 0);
    let mut result = Ok(());
    for p in &probes {
        if INTERRUPTED.load(Ordering::Relaxed) {
            eprintln!("ces lab: interrupted; cleaning up");
            result = Err(Failure { code: 130, message: String::new() });
            break;
        }
        let (destination, protocol, port) = ces_eval::parse_target(&p.target()).map_err(Failure::input)?;
        let flow =
            Flow { source: p.from, tenant: p.tenant.clone(), destination, protocol, port, at: jiff::Timestamp::now() };
        let d = evaluator.decide(&flow).map_err(|e| Failure::input(e.to_string()))?;
        let to = match (&p.name, resolver) {
            (Some(n), Some(r)) => {
                let got = lab.resolve(p.side, p.from, r, n, ces_dns::wire::TYPE_A, false).map_err(failed)?;
                *got.first().ok_or_else(|| failed(format!("the lab's DNS server gave {n} no address")))?
            }
            _ => p.to,
        };
        let real = lab.probe(p.side, p.from, to, p.proto, p.port).map_err(failed)?;
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
    if let Some((pipeline, readers)) = recording.take() {
        // The connections end now (their records carry what they did), then the readers and the pipeline stop.
        let gw = lab.gateway.clone();
        let flushed = ces_lab::spawn_in(&gw, ces_nft::conntrack::flush).map_err(failed)?.join();
        if !matches!(flushed, Ok(Ok(Ok(())))) {
            eprintln!("ces lab: could not end the lab's connections: their records are missing");
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            let _ = r.join();
        }
        backend.flows = None;
        pipeline.close();
        if let Some(dir) = flow_store {
            eprintln!("ces lab: flow records in {} (ces flows --store {0}; ces report --store {0})", dir.display());
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = dns_thread {
        let _ = t.join();
    }
    drop(lab);
    result?;
    println!("{total} flows: {agree} agree, {} differ", total - agree);
    if agree == total { Ok(()) } else { Err(Failure { code: 1, message: String::new() }) }
}
