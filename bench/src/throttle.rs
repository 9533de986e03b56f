//! A token bucket (`tc qdisc ... tbf`) on the egress of both veth ends, so that the link between the two hosts
//! carries at most a given rate each way. Removed when dropped (and in any case with the hosts' network
//! namespaces, which take their veth ends and qdiscs with them).

use std::fmt;

use phaul_testbed::{Host, HostPair};
use serde::Serialize;

use crate::{Context, Result};

/// The token bucket's parameters, as tc takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tbf {
    /// `rate`, e.g. `2gbit`.
    pub rate: String,
    /// `burst`: the bucket's size, e.g. `256kb` (tc's `kb` is KiB).
    pub burst: String,
    /// `latency`: how long a packet may wait in the queue (sets the queue's length), e.g. `10ms`.
    pub latency: String,
}

impl Tbf {
    /// 2 Gbit/s with a 256 KiB bucket (about 1 ms of tokens at that rate: above the 64 KiB GSO segments veth hands
    /// the qdisc, so tbf never has to split or drop one) and at most 10 ms of queue (2.5 MB at that rate, enough
    /// for TCP to keep the link busy on a sub-millisecond RTT without building a deep backlog).
    pub fn two_gbit() -> Tbf {
        Tbf { rate: "2gbit".into(), burst: "256kb".into(), latency: "10ms".into() }
    }

    /// The rate in bytes per second, if tc's unit is one of bit/kbit/mbit/gbit.
    pub fn rate_bytes_s(&self) -> Option<f64> {
        let r = self.rate.to_ascii_lowercase();
        let (num, mul) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)]
            .iter()
            .find_map(|(u, m)| r.strip_suffix(u).map(|n| (n.to_string(), *m)))?;
        num.trim().parse::<f64>().ok().map(|n| n * mul / 8.0)
    }
}

impl fmt::Display for Tbf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tbf rate {} burst {} latency {}", self.rate, self.burst, self.latency)
    }
}

/// The qdiscs in place; dropping it removes them.
pub struct Throttle {
    hosts: Vec<Host>,
}

fn tc_bin() -> &'static str {
    if std::path::Path::new("/usr/sbin/tc").is_file() {
        "/usr/sbin/tc"
    } else {
        "tc"
    }
}

fn tc(host: &Host, args: &[&str]) -> Result<()> {
    let out = host.run(tc_bin(), args).ctx(|| format!("tc {} in {}", args.join(" "), host.name()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tc {} in {} failed: {}", args.join(" "), host.name(), String::from_utf8_lossy(&out.stderr).trim())
            .into())
    }
}

impl Throttle {
    /// Puts `tbf` on both veth ends of `pair` (replacing whatever root qdisc they had).
    pub fn apply(pair: &HostPair, tbf: &Tbf) -> Result<Throttle> {
        let mut t = Throttle { hosts: Vec::new() };
        for host in [pair.a(), pair.b()] {
            let args = ["qdisc", "replace", "dev", host.veth(), "root", "tbf", "rate", &tbf.rate, "burst", &tbf.burst];
            let mut args = args.to_vec();
            args.extend(["latency", &tbf.latency]);
            // Registered first, so that a half-applied throttle is removed too.
            t.hosts.push(host.clone());
            tc(host, &args)?;
        }
        Ok(t)
    }

    /// `tc -s qdisc show` of each veth end, on one line each (bytes sent, drops, overlimits: evidence that the
    /// bucket was in the way).
    pub fn stats(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| match h.run(tc_bin(), ["-s", "qdisc", "show", "dev", h.veth()]) {
                Ok(o) => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    format!("{}: {}", h.name(), text.split_whitespace().collect::<Vec<_>>().join(" "))
                }
                Err(e) => format!("{}: {e}", h.name()),
            })
            .collect()
    }

    /// Removes the qdiscs now (the veth ends go back to their default qdisc).
    pub fn remove(mut self) -> Result<()> {
        self.remove_all()
    }

    fn remove_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for host in std::mem::take(&mut self.hosts) {
            let r = tc(&host, &["qdisc", "del", "dev", host.veth(), "root"]);
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            eprintln!("phaul-bench: warning: removing the throttle: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_bytes() {
        assert_eq!(Tbf::two_gbit().rate_bytes_s(), Some(250e6));
        let t = Tbf { rate: "800mbit".into(), burst: "1kb".into(), latency: "1ms".into() };
        assert_eq!(t.rate_bytes_s(), Some(100e6));
        assert_eq!(Tbf { rate: "fast".into(), ..t }.rate_bytes_s(), None);
    }
}
