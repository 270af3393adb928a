//! Loading rulesets into the kernel with the `nft` command, one atomic transaction per sync.
//!
//! The first load, any change of chains or set declarations, and every full resync replace the table's content in
//! one transaction: an existing table is adopted (its chains and sets flushed and refilled, stale ones deleted), so
//! no packet ever sees a missing, empty or half-loaded table, and a restarted agent takes over without a window. Pod churn changes set elements only, in one
//! transaction. When a transaction fails, nothing of it is applied and the next apply replaces the table whole.

use std::io::Write as _;
use std::process::{Command, Stdio};

use std::collections::BTreeMap;

use crate::{NftSet, Ruleset};

/// How to reach the kernel: the `nft` program and the arguments before `-f -` (for example `ip netns exec gw nft`),
/// and the named network namespace that netlink updates go to (`None`: this process's).
#[derive(Clone, Debug)]
pub struct Nft {
    pub program: Vec<String>,
    pub netns: Option<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Nft { program: vec!["nft".into()], netns: None }
    }
}

#[derive(Debug)]
pub struct ApplyError(pub String);

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ApplyError {}

impl Nft {
    /// The kernel of the named network namespace (`/run/netns/NAME`), from outside it.
    pub fn in_netns(name: &str) -> Nft {
        Nft { program: ["ip", "netns", "exec", name, "nft"].map(String::from).to_vec(), netns: Some(name.to_string()) }
    }

    fn command(&self) -> Command {
        self.tool(None)
    }

    /// The command for `nft`, or for another tool (`tc`) run the same way (same prefix, such as `ip netns exec`).
    fn tool(&self, other: Option<&str>) -> Command {
        let mut program = self.program.clone();
        if let (Some(tool), Some(last)) = (other, program.last_mut()) {
            *last = tool.to_string();
        }
        let mut c = Command::new(&program[0]);
        c.args(&program[1..]);
        // `meta hour` values are read in the nft process's time zone; the renderer writes UTC.
        c.env("TZ", "UTC");
        c
    }

    fn not_found(&self, e: std::io::Error) -> ApplyError {
        if e.kind() == std::io::ErrorKind::NotFound {
            ApplyError(format!(
                "`{}` was not found: the gateway needs the nftables command (Debian: apt-get install nftables)",
                self.program[0]
            ))
        } else {
            ApplyError(format!("cannot run {}: {e}", self.program[0]))
        }
    }

    /// Runs one transaction (`nft -f -`).
    pub fn run(&self, transaction: &str) -> Result<(), ApplyError> {
        let mut child = self
            .command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.not_found(e))?;
        child.stdin.take().expect("piped").write_all(transaction.as_bytes()).map_err(|e| ApplyError(e.to_string()))?;
        let out = child.wait_with_output().map_err(|e| ApplyError(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ApplyError(format!("nft refused the transaction: {}", String::from_utf8_lossy(&out.stderr).trim())))
        }
    }

    /// Sets the uplinks' HTB classes to `rs.shaping` (one `tc -batch`): a root HTB whose unclassified traffic is not
    /// limited, and one class per rate. Without classes, the root qdiscs CES added are removed.
    pub fn shape(&self, rs: &Ruleset) -> Result<(), ApplyError> {
        let mut batch = String::new();
        for dev in &rs.uplinks {
            batch += &format!("qdisc del dev {dev} root\n");
            if rs.shaping.is_empty() {
                continue;
            }
            batch += &format!("qdisc add dev {dev} root handle 1: htb default 0\n");
            for c in &rs.shaping {
                let rate = c.bits_per_second.max(8);
                batch += &format!(
                    "class add dev {dev} parent 1: classid 1:{} htb rate {rate}bit ceil {rate}bit\n",
                    10 + c.mark as u32
                );
            }
        }
        self.tc_batch(&batch)
    }

    /// Removes the root qdiscs of these uplinks (the shaping CES put there).
    pub fn unshape(&self, uplinks: &[String]) -> Result<(), ApplyError> {
        self.tc_batch(&uplinks.iter().map(|dev| format!("qdisc del dev {dev} root\n")).collect::<String>())
    }

    fn tc_batch(&self, batch: &str) -> Result<(), ApplyError> {
        if batch.is_empty() {
            return Ok(());
        }
        // `-force`: a missing root qdisc to delete is not an error.
        let mut child = self
            .tool(Some("tc"))
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ApplyError(format!("cannot run tc (iproute2): {e}")))?;
        child.stdin.take().expect("piped").write_all(batch.as_bytes()).map_err(|e| ApplyError(e.to_string()))?;
        let out = child.wait_with_output().map_err(|e| ApplyError(e.to_string()))?;
        let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| {
                !l.contains("Cannot delete qdisc with handle of zero")
                    && !l.contains("Command failed -:")
                    && !l.trim().is_empty()
            })
            .map(str::to_string)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApplyError(format!("tc refused the shaping: {}", errors.join("; "))))
        }
    }

    /// `nft list table inet NAME`, or `None` when there is no such table.
    pub fn list_table(&self, table: &str) -> Result<Option<String>, ApplyError> {
        self.list(table, &[])
    }

    /// The same in nft's JSON form (`nft -j`), which carries every rule's counter and comment.
    pub fn list_table_json(&self, table: &str) -> Result<Option<String>, ApplyError> {
        self.list(table, &["-j"])
    }

    fn list(&self, table: &str, flags: &[&str]) -> Result<Option<String>, ApplyError> {
        let out = self
            .command()
            .args(flags)
            .args(["list", "table", "inet", table])
            .output()
            .map_err(|e| self.not_found(e))?;
        if out.status.success() { Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned())) } else { Ok(None) }
    }

    /// Whether the kernel has nft's `queue` statement (`nft_queue`): checked by a transaction that is validated by the
    /// kernel and never committed (`nft -c`).
    pub fn supports_queue(&self) -> bool {
        let probe = "table inet ces_probe_queue {\n\tchain c {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tmeta l4proto udp th sport 53 queue num 0 bypass\n\t}\n}\n";
        let Ok(mut child) = self
            .command()
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        if child.stdin.take().expect("piped").write_all(probe.as_bytes()).is_err() {
            return false;
        }
        child.wait().is_ok_and(|s| s.success())
    }

    /// The iptables-nft chain that queues DNS answers for `table` on kernels without nft's `queue` (in the `mangle`
    /// table, jumped to first from `FORWARD`).
    pub fn dns_chain(table: &str) -> String {
        let mut c = format!("CES-DNS-{table}");
        c.truncate(28);
        c
    }

    fn iptables(&self, v6: bool, args: &[&str]) -> Result<String, ApplyError> {
        let tool = if v6 { "ip6tables-nft" } else { "iptables-nft" };
        let out = self.tool(Some(tool)).args(["-w", "-t", "mangle"]).args(args).output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ApplyError(format!(
                    "`{tool}` was not found: on this kernel (no nft `queue` statement) the gateway holds DNS answers through iptables-nft's NFQUEUE target (Debian: apt-get install iptables)"
                ))
            } else {
                ApplyError(format!("cannot run {tool}: {e}"))
            }
        })?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ApplyError(format!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
        }
    }

    /// Makes the iptables-nft hook that queues `table`'s DNS answers be `queue` (or absent): answers to the clients'
    /// queries (conntrack reply direction, source port 53, UDP and TCP), IPv4 and IPv6. Rules that are already as
    /// wanted are left alone, so that no answer passes unheld while they are rewritten.
    pub fn external_dns_hook(&self, table: &str, queue: Option<crate::DnsQueue>) -> Result<(), ApplyError> {
        let chain = Self::dns_chain(table);
        for v6 in [false, true] {
            let listed = self.iptables(v6, &["-S", &chain]).ok();
            let Some(q) = queue else {
                if listed.is_some() {
                    while self.iptables(v6, &["-D", "FORWARD", "-j", &chain]).is_ok() {}
                    self.iptables(v6, &["-F", &chain])?;
                    self.iptables(v6, &["-X", &chain])?;
                }
                continue;
            };
            let num = q.num.to_string();
            let rules: Vec<Vec<&str>> = ["udp", "tcp"]
                .into_iter()
                .map(|proto| {
                    let mut r = vec!["-A", chain.as_str(), "-p", proto, "-m", proto, "--sport", "53"];
                    r.extend(["-m", "conntrack", "--ctdir", "REPLY", "-j", "NFQUEUE", "--queue-num", num.as_str()]);
                    if q.bypass {
                        r.push("--queue-bypass");
                    }
                    r
                })
                .collect();
            let want: Vec<String> =
                std::iter::once(format!("-N {chain}")).chain(rules.iter().map(|r| r.join(" "))).collect();
            let have: Vec<String> = listed.as_deref().unwrap_or("").lines().map(str::to_string).collect();
            if have != want {
                if listed.is_none() {
                    self.iptables(v6, &["-N", &chain])?;
                } else {
                    self.iptables(v6, &["-F", &chain])?;
                }
                for r in &rules {
                    self.iptables(v6, r)?;
                }
            }
            if self.iptables(v6, &["-C", "FORWARD", "-j", &chain]).is_err() {
                self.iptables(v6, &["-I", "FORWARD", "1", "-j", &chain])?;
            }
        }
        Ok(())
    }

    /// Removes the table; `false` when there was none.
    pub fn delete_table(&self, table: &str) -> Result<bool, ApplyError> {
        if self.list_table(table)?.is_none() {
            return Ok(false);
        }
        self.run(&format!("delete table inet {table}\n"))?;
        Ok(true)
    }
}

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The table was replaced whole.
    Replaced,
    /// Only the elements of this many sets changed.
    Updated(usize),
    /// Nothing changed; no transaction was run.
    Unchanged,
}

/// Keeps the kernel's table equal to the last ruleset applied.
#[derive(Debug, Default)]
pub struct Applier {
    pub nft: Nft,
    last: Option<Ruleset>,
    /// Why the last apply replaced the table rather than updating elements (`None`: it did not, or nothing was
    /// there to compare with).
    pub replaced_for: Option<String>,
}

impl Applier {
    pub fn new(nft: Nft) -> Applier {
        Applier { nft, last: None, replaced_for: None }
    }

    /// Applies a ruleset: elements only when the structure is unchanged ([`Applier::update_sets`]), else (and always
    /// with `full`) the whole table.
    pub fn apply(&mut self, rs: &Ruleset, full: bool) -> Result<Applied, ApplyError> {
        self.replaced_for = match &self.last {
            Some(prev) if !full => rs.structure_change(prev).map(|w| format!("{w} changed")),
            Some(_) => Some("a full pass".into()),
            None => None,
        };
        match &self.last {
            Some(prev) if !full && rs.same_structure(prev) => {
                let changed = rs.changed_sets(prev);
                let applied = self.update_sets(&changed)?;
                self.last = Some(rs.clone());
                Ok(applied)
            }
            _ => self.replace(rs),
        }
    }

    /// The ruleset last applied, if the kernel is known to hold it.
    pub fn last(&self) -> Option<&Ruleset> {
        self.last.as_ref()
    }

    /// Sets the elements of these sets of the table last applied, and nothing else. Refused when a set is not one the
    /// table has, or nothing was applied yet.
    pub fn apply_sets(&mut self, sets: BTreeMap<String, NftSet>) -> Result<Applied, ApplyError> {
        let Some(last) = &self.last else { return Err(ApplyError("no table applied yet".into())) };
        let mut changed = BTreeMap::new();
        for (name, set) in sets {
            match last.sets.get(&name) {
                Some(prev) if prev.kind == set.kind => {
                    if prev.elements != set.elements {
                        changed.insert(name, set);
                    }
                }
                _ => return Err(ApplyError(format!("set {name} is not one of table inet {}", last.table))),
            }
        }
        let applied = self.update_sets(&changed)?;
        self.last.as_mut().expect("checked").sets.extend(changed);
        Ok(applied)
    }

    /// Changes the elements of these sets of the table last applied, in one transaction: over netlink when every
    /// element change allows it (see [`crate::netlink`]), else with `nft`, which flushes and refills them. On failure
    /// nothing is known of the table any more, so the next apply replaces it.
    fn update_sets(&mut self, changed: &BTreeMap<String, NftSet>) -> Result<Applied, ApplyError> {
        let Some(last) = &self.last else { return Err(ApplyError("no table applied yet".into())) };
        if changed.is_empty() {
            return Ok(Applied::Unchanged);
        }
        let updates: Option<Vec<_>> =
            changed.iter().map(|(name, set)| crate::render::set_update(name, &last.sets[name], set)).collect();
        let result = match updates {
            Some(u) => {
                crate::netlink::apply(self.nft.netns.as_deref(), &last.table, &u).map_err(|e| ApplyError(e.to_string()))
            }
            None => self.nft.run(&crate::render::refill_transaction(&last.table, changed)),
        };
        match result {
            Ok(()) => Ok(Applied::Updated(changed.len())),
            Err(e) => {
                self.last = None;
                Err(e)
            }
        }
    }

    fn replace(&mut self, rs: &Ruleset) -> Result<Applied, ApplyError> {
        let existing = self.nft.list_table(&rs.table)?.map(|l| crate::Existing::parse(&l));
        match self.nft.run(&rs.replace_transaction(existing.as_ref())) {
            Ok(()) => {
                let shaping_changed =
                    self.last.as_ref().is_none_or(|l| l.shaping != rs.shaping || l.uplinks != rs.uplinks);
                self.last = Some(rs.clone());
                if shaping_changed {
                    self.nft.shape(rs)?;
                }
                Ok(Applied::Replaced)
            }
            Err(e) => {
                self.last = None;
                Err(e)
            }
        }
    }
}
