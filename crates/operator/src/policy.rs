//! The scaling policy: from each pod's reported load to how many pods the
//! fleet should have, which pods to drain before a scale-down and which to
//! shed clients from after a scale-up. Pure: no I/O and no clock of its own,
//! so every rule is table-tested.
//!
//! Why not a HorizontalPodAutoscaler: long-lived WebSocket connections stay
//! where they are. A new pod gets no existing clients (so the fleet needs
//! rebalancing), and a removed pod drops thousands at once (so pods must be
//! drained first, and the ReplicaSet told which ones to remove).

use std::{collections::VecDeque, time::Duration};

use runcast_core::admin::PodStats;

/// One gateway pod as the operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodLoad {
    pub name: String,
    /// The pod's Ready condition.
    pub ready: bool,
    /// What it reported; `None` if its stats endpoint did not answer.
    pub stats: Option<PodStats>,
}

impl PodLoad {
    fn draining(&self) -> bool {
        self.stats.as_ref().is_some_and(|s| s.draining)
    }
    fn connections(&self) -> u64 {
        self.stats.as_ref().map_or(0, |s| s.connections)
    }
    /// Drained: nothing left on it and nothing left to send.
    fn empty(&self) -> bool {
        self.stats
            .as_ref()
            .is_some_and(|s| s.draining && s.connections == 0 && s.pending_hints == 0)
    }
}

/// The targets, from the `RuncastCluster` spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub min: i32,
    pub max: i32,
    pub connections_per_pod: u64,
    pub messages_per_second_per_pod: f64,
    pub up_window: Duration,
    pub down_window: Duration,
    pub rebalance: bool,
}

/// Load within this share of the target does not change the replica
/// count (as the HPA's default tolerance), so noise around a boundary does
/// not flap.
const TOLERANCE: f64 = 0.1;
/// A pod is shed only when it holds this much more than the fair share,
/// and only by at least this many clients.
const SHED_ABOVE: f64 = 1.2;
const SHED_AT_LEAST: u64 = 10;

/// Raw recommendations over time, for the stabilization windows.
#[derive(Debug, Default, Clone)]
pub struct History {
    recs: VecDeque<(Duration, i32)>,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The stabilized replica count the policy wants.
    pub desired: i32,
    /// What the Deployment's replicas should be set to now. Below the
    /// current count only once the pods to remove are drained.
    pub replicas: i32,
    /// Pods to drain now (and mark as the ones to delete).
    pub drain: Vec<String>,
    /// Pods to shed clients from, and how many.
    pub shed: Vec<(String, u64)>,
    /// Why, for the log and the Scaling condition.
    pub reason: String,
}

/// Decides, at time `now` (any monotonic clock), for a Deployment that
/// currently asks for `current` replicas.
pub fn plan(
    pods: &[PodLoad],
    current: i32,
    t: &Targets,
    history: &mut History,
    now: Duration,
) -> Plan {
    let connections: u64 = pods.iter().map(PodLoad::connections).sum();
    let rate: f64 = pods
        .iter()
        .filter_map(|p| p.stats.as_ref())
        .map(|s| s.delivered_per_sec)
        // A pod's odd figure (NaN, negative) counts as nothing. And a fold
        // from +0: a float `sum` of nothing is -0, which read "-0 msg/s".
        .filter(|r| r.is_finite() && *r > 0.0)
        .fold(0.0, |a, b| a + b);
    let draining: Vec<&PodLoad> = pods.iter().filter(|p| p.draining()).collect();
    // Pods that stay: what capacity is measured against.
    let staying = (current - draining.len() as i32).max(0);

    let by_conns = connections.div_ceil(t.connections_per_pod.max(1)) as i32;
    let by_rate = (rate / t.messages_per_second_per_pod.max(1.0)).ceil() as i32;
    let mut raw = by_conns.max(by_rate);
    if staying > 0 {
        let usage = (connections as f64 / (staying as f64 * t.connections_per_pod.max(1) as f64))
            .max(rate / (staying as f64 * t.messages_per_second_per_pod.max(1.0)));
        if (usage - 1.0).abs() <= TOLERANCE {
            raw = staying;
        }
    }
    // A ready pod we cannot hear from might be busy: never scale down blind.
    let blind = pods.iter().any(|p| p.ready && p.stats.is_none());
    if blind {
        raw = raw.max(staying);
    }
    let raw = raw.clamp(t.min, t.max.max(t.min));

    history.recs.push_back((now, raw));
    let keep = t.up_window.max(t.down_window);
    while history
        .recs
        .front()
        .is_some_and(|(at, _)| now.saturating_sub(*at) > keep)
    {
        history.recs.pop_front();
    }
    let within = |w: Duration| {
        history
            .recs
            .iter()
            .filter(move |(at, _)| now.saturating_sub(*at) <= w)
            .map(|(_, r)| *r)
    };
    // Scale up only to what every recommendation in the up window allows,
    // down only to what every one in the down window allows.
    let up_to = within(t.up_window).min().unwrap_or(raw);
    let down_to = within(t.down_window).max().unwrap_or(raw);
    let desired = if staying < up_to {
        up_to
    } else if staying > down_to {
        down_to
    } else {
        staying
    }
    .clamp(t.min, t.max.max(t.min));

    let mut out = Plan {
        desired,
        replicas: current,
        drain: Vec::new(),
        shed: Vec::new(),
        reason: String::new(),
    };
    let empty = draining.iter().filter(|p| p.empty()).count() as i32;
    if desired > staying {
        // Drained pods still go; new ones come on top of those that stay.
        out.replicas = desired + (draining.len() as i32 - empty);
        out.reason = format!(
            "{connections} connections and {rate:.0} msg/s need {desired} pods; {staying} serve"
        );
        return out;
    }
    // Drained pods can go: lowering replicas removes exactly them (the
    // caller marks them with a low pod-deletion-cost).
    out.replicas = current - empty;
    if desired < staying {
        // Pods that are not ready (or not created yet) hold no clients and
        // are the ReplicaSet's first choice anyway: they go at once. Only
        // the rest of the reduction needs drained pods.
        let ready_staying = pods.iter().filter(|p| p.ready && !p.draining()).count() as i32;
        let free = (staying - ready_staying).clamp(0, staying - desired);
        out.replicas -= free;
        let mut candidates: Vec<&PodLoad> = pods
            .iter()
            .filter(|p| p.ready && !p.draining() && p.stats.is_some())
            .collect();
        candidates.sort_by_key(|p| (p.connections(), p.name.clone()));
        out.drain = candidates
            .iter()
            .take((staying - desired - free) as usize)
            .map(|p| p.name.clone())
            .collect();
        out.reason = format!(
            "{connections} connections and {rate:.0} msg/s need {desired} pods; draining [{}]",
            out.drain.join(", ")
        );
    }
    // No rebalancing while pods drain: their clients are moving already.
    if !out.drain.is_empty() || !draining.is_empty() {
        if out.reason.is_empty() {
            out.reason = format!(
                "{} pods draining, {empty} drained",
                draining.len() as i32 - empty
            );
        }
        return out;
    }
    // Steady: even out connections once every pod is ready and reporting.
    let all_reporting = pods.iter().all(|p| p.ready && p.stats.is_some());
    let hints_pending = pods
        .iter()
        .any(|p| p.stats.as_ref().is_some_and(|s| s.pending_hints > 0));
    if t.rebalance && all_reporting && !hints_pending && pods.len() > 1 {
        let fair = connections.div_ceil(pods.len() as u64);
        for p in pods {
            let c = p.connections();
            if c as f64 > fair as f64 * SHED_ABOVE && c - fair >= SHED_AT_LEAST {
                out.shed.push((p.name.clone(), c - fair));
            }
        }
        if !out.shed.is_empty() {
            out.reason = format!("rebalancing to about {fair} connections per pod");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Targets {
        Targets {
            min: 2,
            max: 10,
            connections_per_pod: 1000,
            messages_per_second_per_pod: 10_000.0,
            up_window: Duration::ZERO,
            down_window: Duration::ZERO,
            rebalance: true,
        }
    }

    fn pod(name: &str, connections: u64) -> PodLoad {
        PodLoad {
            name: name.into(),
            ready: true,
            stats: Some(PodStats {
                connections,
                ..PodStats::default()
            }),
        }
    }

    fn with(mut p: PodLoad, f: impl FnOnce(&mut PodLoad)) -> PodLoad {
        f(&mut p);
        p
    }

    fn draining(name: &str, connections: u64) -> PodLoad {
        with(pod(name, connections), |p| {
            let s = p.stats.as_mut().unwrap();
            s.draining = true;
            s.pending_hints = connections;
        })
    }

    fn once(pods: &[PodLoad], current: i32, t: &Targets) -> Plan {
        plan(pods, current, t, &mut History::default(), Duration::ZERO)
    }

    #[test]
    fn replicas_follow_the_targets_within_min_and_max() {
        let t = targets();
        // (connections per pod, pods, msg/s per pod) -> desired
        for (conns, n, rate, want) in [
            (1000, 2, 0.0, 2),     // at target
            (1500, 2, 0.0, 3),     // 3000 connections need 3
            (1050, 2, 0.0, 2),     // within tolerance: stay
            (300, 4, 0.0, 2),      // 1200 need 2
            (0, 3, 0.0, 2),        // never below min
            (9000, 2, 0.0, 10),    // never above max
            (100, 2, 25_000.0, 5), // message rate rules: 50k msg/s need 5
        ] {
            let pods: Vec<_> = (0..n)
                .map(|i| {
                    with(pod(&format!("p{i}"), conns), |p| {
                        p.stats.as_mut().unwrap().delivered_per_sec = rate;
                    })
                })
                .collect();
            assert_eq!(once(&pods, n, &t).desired, want, "{conns}x{n} at {rate}");
        }
    }

    /// An outside tester saw "-0 msg/s" in the Scaling condition: a float
    /// sum of no pods' rates. And a pod's NaN or negative rate must not
    /// turn the sizing into nonsense.
    #[test]
    fn the_rate_is_never_minus_zero_and_odd_figures_count_as_nothing() {
        let t = targets();
        // Pods without stats yet (just started) and one that reports.
        let silent = |name: &str| with(pod(name, 0), |p| p.stats = None);
        let p = once(&[silent("a"), silent("b"), silent("c"), pod("d", 0)], 4, &t);
        let p2 = once(&[silent("a"), silent("b")], 2, &t);
        for p in [p, p2] {
            assert!(!p.reason.contains("-0"), "{}", p.reason);
        }
        for odd in [f64::NAN, -50_000.0, f64::INFINITY] {
            let pods = [
                with(pod("a", 1000), |p| {
                    p.stats.as_mut().unwrap().delivered_per_sec = odd
                }),
                pod("b", 1000),
            ];
            assert_eq!(once(&pods, 2, &t).desired, 2, "rate {odd}");
        }
    }

    #[test]
    fn scale_up_sets_replicas_at_once_and_does_not_drain() {
        let p = once(&[pod("a", 2000), pod("b", 2000)], 2, &targets());
        assert_eq!((p.desired, p.replicas), (4, 4));
        assert!(p.drain.is_empty() && p.shed.is_empty());
    }

    #[test]
    fn scale_down_drains_the_least_loaded_first_and_keeps_replicas_until_drained() {
        let pods = [pod("a", 300), pod("b", 100), pod("c", 200), pod("d", 250)];
        let p = once(&pods, 4, &targets());
        assert_eq!(p.desired, 2);
        assert_eq!(p.drain, ["b", "c"]);
        assert_eq!(p.replicas, 4, "nothing is removed before it is drained");
        assert!(p.shed.is_empty());
    }

    #[test]
    fn pods_already_draining_are_not_drained_again_and_go_when_empty() {
        let t = targets();
        // b drains with 100 clients left; the others carry 850 in all.
        let pods = [pod("a", 450), draining("b", 100), pod("c", 400)];
        let p = once(&pods, 3, &t);
        assert_eq!(p.desired, 2);
        assert!(p.drain.is_empty(), "{p:?}");
        assert_eq!(p.replicas, 3);
        // Once b is empty, replicas drop by exactly one.
        let pods = [pod("a", 500), draining("b", 0), pod("c", 450)];
        let mut b = pods[1].clone();
        b.stats.as_mut().unwrap().pending_hints = 0;
        let pods = [pods[0].clone(), b, pods[2].clone()];
        let p = once(&pods, 3, &t);
        assert_eq!((p.desired, p.replicas), (2, 2));
        assert!(p.drain.is_empty() && p.shed.is_empty());
    }

    #[test]
    fn rebalance_sheds_pods_above_the_fair_share_once_all_are_ready() {
        let t = targets();
        // After a scale-up: two old pods full, one new pod empty.
        let pods = [pod("old-1", 900), pod("old-2", 900), pod("new", 0)];
        let p = once(&pods, 3, &t);
        assert_eq!(
            p.desired, 2,
            "1800 connections fit in 2, but no drain: within down window 0"
        );
        // With a down window, the fleet stays at 3 and rebalances instead.
        let t = Targets {
            down_window: Duration::from_secs(300),
            ..t
        };
        let mut h = History::default();
        plan(&pods, 3, &t, &mut h, Duration::ZERO); // an earlier recommendation of 2...
        let mut h = History::default();
        h.recs.push_back((Duration::ZERO, 3));
        let p = plan(&pods, 3, &t, &mut h, Duration::from_secs(10));
        assert_eq!(p.desired, 3);
        assert_eq!(
            p.shed,
            [("old-1".to_string(), 300), ("old-2".to_string(), 300)]
        );
        // Not while the new pod is not ready yet.
        let pods_nr = [
            pods[0].clone(),
            pods[1].clone(),
            with(pods[2].clone(), |p| p.ready = false),
        ];
        let p = plan(&pods_nr, 3, &t, &mut h, Duration::from_secs(20));
        assert!(p.shed.is_empty(), "{p:?}");
        // Not while hints are still being sent.
        let busy = with(pods[0].clone(), |p| {
            p.stats.as_mut().unwrap().pending_hints = 5
        });
        let p = plan(
            &[busy, pods[1].clone(), pods[2].clone()],
            3,
            &t,
            &mut h,
            Duration::from_secs(30),
        );
        assert!(p.shed.is_empty());
        // Small imbalances are left alone.
        let p = plan(
            &[pod("a", 640), pod("b", 600), pod("c", 560)],
            3,
            &t,
            &mut h,
            Duration::from_secs(40),
        );
        assert!(p.shed.is_empty());
    }

    #[test]
    fn stabilization_windows_hold_back_scaling() {
        let t = Targets {
            up_window: Duration::from_secs(30),
            down_window: Duration::from_secs(300),
            ..targets()
        };
        let mut h = History::default();
        let at = Duration::from_secs;
        // Load at 2 pods for a while, then a spike needing 4.
        for s in 0..3 {
            plan(&[pod("a", 900), pod("b", 900)], 2, &t, &mut h, at(s * 10));
        }
        let spike = [pod("a", 2000), pod("b", 2000)];
        assert_eq!(
            plan(&spike, 2, &t, &mut h, at(30)).desired,
            2,
            "2 is still in the up window"
        );
        assert_eq!(plan(&spike, 2, &t, &mut h, at(50)).desired, 2);
        assert_eq!(plan(&spike, 2, &t, &mut h, at(61)).desired, 4, "30 s of 4s");
        // Load drops: the fleet keeps 4 for the down window.
        let calm: Vec<_> = (0..4).map(|i| pod(&format!("p{i}"), 100)).collect();
        for s in [70, 200, 350] {
            let p = plan(&calm, 4, &t, &mut h, at(s));
            assert_eq!(p.desired, 4, "at {s}s");
            assert!(p.drain.is_empty());
        }
        let p = plan(&calm, 4, &t, &mut h, at(362));
        assert_eq!(p.desired, 2, "300 s of 2s");
        assert_eq!(p.drain.len(), 2);
    }

    #[test]
    fn noisy_load_does_not_flap() {
        let t = Targets {
            up_window: Duration::from_secs(30),
            down_window: Duration::from_secs(120),
            ..targets()
        };
        let mut h = History::default();
        let mut replicas = 3;
        let mut changes = 0;
        // Load jumps between 1,700 and 3,300 connections every 10 s.
        for step in 0..60u64 {
            let per = if step % 2 == 0 { 1700 } else { 3300 } / 3;
            let pods: Vec<_> = (0..3).map(|i| pod(&format!("p{i}"), per)).collect();
            let p = plan(&pods, replicas, &t, &mut h, Duration::from_secs(step * 10));
            if p.desired != replicas {
                changes += 1;
                replicas = p.desired;
            }
        }
        assert!(
            changes <= 1,
            "{changes} replica changes in 10 minutes of noise"
        );
    }

    #[test]
    fn pods_that_are_not_ready_or_silent_are_never_drained_and_block_blind_scale_down() {
        let t = targets();
        let pods = [
            pod("a", 100),
            with(pod("b", 0), |p| p.ready = false),
            PodLoad {
                name: "c".into(),
                ready: true,
                stats: None,
            },
        ];
        let p = once(&pods, 3, &t);
        // c did not answer: it may be full; do not scale down.
        assert_eq!(p.desired, 3, "{p:?}");
        assert!(p.drain.is_empty());
        // Without the silent pod: the not-ready one (and the one not
        // created yet) go first, without draining the pod that serves.
        let p = once(&pods[..2], 3, &t);
        assert_eq!((p.desired, p.replicas), (2, 2), "{p:?}");
        assert!(p.drain.is_empty(), "{p:?}");
    }
}
