//! Per-client-IP limits on long-lived sessions (WebSocket and SSE): how
//! many a single address may hold, and how fast it may open new ones. One
//! abusive address is refused with 429 while everyone else goes on.
//!
//! Behind a load balancer every connection comes from the proxy, so the
//! client's address is read from `X-Forwarded-For`, but only when the peer
//! is a configured trusted proxy (otherwise anyone could claim any
//! address): the rightmost entry that is not itself a trusted proxy.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use ipnet::IpNet;

/// Entries of addresses with no session that were last seen this long ago
/// are forgotten when the table grows large.
const FORGET_AFTER_SECS: u64 = 60;
/// The table is swept when it holds more addresses than this, so memory
/// stays bounded whatever the number of distinct addresses.
const SWEEP_ABOVE: usize = 50_000;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// Refills for the time since the last call, then takes one token.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A burst of twice the rate, and at least one.
fn burst(rate: f64) -> f64 {
    (rate * 2.0).max(1.0)
}

#[derive(Debug)]
struct Slot {
    active: usize,
    bucket: Bucket,
}

/// Why a new session was refused (the `reason` label of
/// `runcast_refused_sessions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address already holds `max_per_ip` sessions.
    PerIp,
    /// The address opens sessions faster than `rate_per_ip`.
    Rate,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerIp => "per_ip",
            Self::Rate => "rate",
        }
    }
}

#[derive(Debug)]
pub struct IpLimits {
    max_per_ip: usize,
    /// New sessions per second per address, with a burst of twice that.
    rate_per_ip: f64,
    trusted: Vec<IpNet>,
    table: Mutex<HashMap<IpAddr, Slot>>,
}

impl IpLimits {
    /// `max_per_ip` or `rate_per_ip` of 0 turns that limit off.
    pub fn new(max_per_ip: usize, rate_per_ip: f64, trusted: Vec<IpNet>) -> Self {
        Self {
            max_per_ip,
            rate_per_ip,
            trusted,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer's, or from `X-Forwarded-For` when the
    /// peer is a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let Some(xff) = forwarded_for else {
            return peer;
        };
        // Rightmost first: entries left of an untrusted hop may be forged.
        for hop in xff.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.trusted(ip) => continue,
                Ok(ip) => return ip,
                Err(_) => return peer,
            }
        }
        peer
    }

    /// Takes a session slot for `ip`; released when the guard drops.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<IpGuard, Refusal> {
        let now = Instant::now();
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() > SWEEP_ABOVE {
            t.retain(|_, s| {
                s.active > 0 || now.duration_since(s.bucket.last).as_secs() < FORGET_AFTER_SECS
            });
        }
        let burst = burst(self.rate_per_ip);
        let slot = t.entry(ip).or_insert(Slot {
            active: 0,
            bucket: Bucket::full(burst, now),
        });
        if self.max_per_ip > 0 && slot.active >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        if self.rate_per_ip > 0.0 && !slot.bucket.take(self.rate_per_ip, burst, now) {
            return Err(Refusal::Rate);
        }
        slot.active += 1;
        Ok(IpGuard {
            limits: self.clone(),
            ip,
        })
    }

    /// Sessions `ip` holds now.
    pub fn active(&self, ip: IpAddr) -> usize {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.get(&ip).map_or(0, |s| s.active)
    }
}

/// One session's slot under its address's limit.
#[derive(Debug)]
pub struct IpGuard {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        let mut t = self.limits.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = t.get_mut(&self.ip) {
            s.active = s.active.saturating_sub(1);
        }
    }
}

/// Publish requests per second per API key, with a burst of twice that.
/// One entry per configured key, so the table is as small as the config.
#[derive(Debug)]
pub struct KeyRates {
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl KeyRates {
    /// `rate` of 0 turns the limit off.
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the key `name` may publish now.
    pub fn take(&self, name: &str) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let burst = burst(self.rate);
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.entry(name.to_owned())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(self.rate, burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_key_has_its_own_publish_rate() {
        let r = KeyRates::new(3.0);
        assert_eq!(
            (0..10).filter(|_| r.take("ci")).count(),
            6,
            "burst of twice the rate"
        );
        assert!(r.take("ops"), "another key is not affected");
        assert!(KeyRates::new(0.0).take("any"));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = IpLimits::new(0, 0.0, vec!["10.0.0.0/8".parse().unwrap()]);
        let xff = Some("203.0.113.9, 198.51.100.7, 10.1.2.3");
        assert_eq!(
            l.client_ip(ip("10.0.0.5"), xff),
            ip("198.51.100.7"),
            "rightmost untrusted hop"
        );
        assert_eq!(
            l.client_ip(ip("192.0.2.1"), xff),
            ip("192.0.2.1"),
            "untrusted peer: XFF ignored"
        );
        assert_eq!(l.client_ip(ip("10.0.0.5"), None), ip("10.0.0.5"));
        assert_eq!(l.client_ip(ip("10.0.0.5"), Some("garbage")), ip("10.0.0.5"));
        assert_eq!(
            l.client_ip(ip("10.0.0.5"), Some("10.9.9.9")),
            ip("10.0.0.5"),
            "all trusted: the peer"
        );
    }

    #[test]
    fn per_ip_caps_and_rates_hold_and_release() {
        let l = Arc::new(IpLimits::new(2, 0.0, vec![]));
        let a = l.acquire(ip("192.0.2.1")).unwrap();
        let _b = l.acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(l.acquire(ip("192.0.2.1")).unwrap_err(), Refusal::PerIp);
        assert!(
            l.acquire(ip("192.0.2.2")).is_ok(),
            "another address is not affected"
        );
        drop(a);
        assert!(
            l.acquire(ip("192.0.2.1")).is_ok(),
            "a closed session frees its slot"
        );

        let r = Arc::new(IpLimits::new(0, 5.0, vec![]));
        let got: Vec<_> = (0..20).map(|_| r.acquire(ip("192.0.2.3"))).collect();
        let ok = got.iter().filter(|g| g.is_ok()).count();
        assert_eq!(ok, 10, "a burst of twice the rate, then refusals");
        assert!(got.iter().any(|g| matches!(g, Err(Refusal::Rate))));
    }
}
