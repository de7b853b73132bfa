//! Walking a run's history page by page, for the two places that replay it:
//! a session catching a client up, and the fan-out repairing a lagged feed.
//! Both must turn what retention already dropped into a gap notice and
//! never send an event twice; this is the one copy of that logic.

use std::{collections::VecDeque, sync::Arc};

use runcast_bus::{Bus, BusError};
use runcast_core::{Event, RunId};

/// What a replay yields, in seq order.
#[derive(Debug)]
pub enum Replayed {
    /// Events `from..=to` are gone from history.
    Gap {
        from: u64,
        to: u64,
    },
    Event(Arc<Event>),
}

/// Walks a run's history from `next` up to `to`, one item per call; reads
/// from the bus a page at a time.
pub struct Replay<'a> {
    bus: &'a dyn Bus,
    run: &'a RunId,
    /// The first seq not yet read from the bus.
    next: u64,
    to: u64,
    page: usize,
    done: bool,
    /// A seq the caller knows the run reached (its state's, or a live
    /// frame's predecessor), whatever history still holds.
    known_head: u64,
    /// Read and not yet handed out.
    ready: VecDeque<Replayed>,
    /// The first seq not yet handed out: where a cursor stands afterwards.
    yielded: u64,
}

impl<'a> Replay<'a> {
    pub fn new(bus: &'a dyn Bus, run: &'a RunId, from: u64, to: u64, page: usize) -> Self {
        Self {
            bus,
            run,
            next: from.max(1),
            to,
            page: page.max(1),
            done: false,
            known_head: 0,
            ready: VecDeque::new(),
            yielded: from.max(1),
        }
    }

    /// The run is known to have reached `head`. When history's head is
    /// lower and the bus says every seq up to `head` is gone, retention
    /// dropped the run's newest events too: on NATS a run whose every event
    /// expired looks like one that never had any, and only this tells the
    /// replay to announce the loss.
    pub fn known_head(mut self, head: u64) -> Self {
        self.known_head = head;
        self
    }

    /// The first seq not handed out yet: where a cursor stands afterwards.
    pub fn next_seq(&self) -> u64 {
        self.yielded
    }

    /// The next thing to send, in seq order; `None` once history holds
    /// nothing more up to `to`. After an error the walk can be resumed or
    /// dropped: `next_seq` still says where it stopped.
    pub async fn next(&mut self) -> Result<Option<Replayed>, BusError> {
        if self.ready.is_empty() {
            self.fill().await?;
        }
        let item = self.ready.pop_front();
        match &item {
            Some(Replayed::Gap { to, .. }) => self.yielded = to + 1,
            Some(Replayed::Event(ev)) => self.yielded = ev.seq + 1,
            None => {}
        }
        Ok(item)
    }

    /// Reads the next page into `ready`; leaves it empty at the end.
    async fn fill(&mut self) -> Result<(), BusError> {
        while self.ready.is_empty() {
            if self.done || self.next > self.to {
                return Ok(());
            }
            self.read_page().await?;
        }
        Ok(())
    }

    async fn read_page(&mut self) -> Result<(), BusError> {
        let page = self.bus.read(self.run, self.next, self.page).await?;
        // Announced only when the bus proves the seqs gone: a replica that
        // lags behind the state must not turn retained events into a gap.
        if page.head < self.known_head && self.known_head < self.bus.gone_before().await? {
            let to = self.known_head.min(self.to);
            self.done = true;
            if to >= self.next {
                self.ready.push_back(Replayed::Gap {
                    from: self.next,
                    to,
                });
                self.next = to + 1;
            }
            return Ok(());
        }
        // Retention dropped what lies before the oldest retained seq; no
        // event can lie beyond the head.
        let gap_to = (page.first.saturating_sub(1)).min(page.head).min(self.to);
        if page.first > self.next && gap_to >= self.next {
            self.ready.push_back(Replayed::Gap {
                from: self.next,
                to: gap_to,
            });
            self.next = gap_to + 1;
        }
        let mut events = 0;
        for ev in &page.events {
            if ev.seq > self.to {
                break;
            }
            if ev.seq >= self.next {
                self.next = ev.seq + 1;
                self.ready.push_back(Replayed::Event(ev.clone()));
                events += 1;
            }
        }
        // A page whose head is short of the known one came from a lagging
        // replica or a read a moment old (a bus may share those): read on
        // from its head rather than stop there, until a read brings nothing.
        if events == 0 || self.next > page.head.max(self.known_head) {
            self.done = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runcast_bus::{EmbeddedBus, Retention};
    use runcast_core::{EventKind, NewEvent};

    fn ev() -> NewEvent {
        NewEvent::json(EventKind::Log, &serde_json::json!("x")).unwrap()
    }

    async fn walk(bus: &dyn Bus, run: &RunId, from: u64, to: u64, page: usize) -> Vec<String> {
        let mut r = Replay::new(bus, run, from, to, page);
        let mut out = Vec::new();
        while let Some(i) = r.next().await.unwrap() {
            out.push(match i {
                Replayed::Gap { from, to } => format!("gap {from}-{to}"),
                Replayed::Event(e) => e.seq.to_string(),
            });
        }
        out
    }

    #[tokio::test]
    async fn pages_gaps_and_bounds() {
        let bus = EmbeddedBus::new(Retention {
            max_events_per_run: 5,
            ..Retention::default()
        });
        let run = RunId::parse("r").unwrap();
        for _ in 0..8 {
            bus.publish(&run, vec![ev()]).await.unwrap();
        }
        // 1..=3 were dropped; 4..=8 are kept.
        assert_eq!(
            walk(&bus, &run, 1, u64::MAX, 2).await,
            ["gap 1-3", "4", "5", "6", "7", "8"]
        );
        assert_eq!(walk(&bus, &run, 5, 6, 2).await, ["5", "6"]);
        assert_eq!(walk(&bus, &run, 2, 2, 2).await, ["gap 2-2"]);
        assert!(walk(&bus, &run, 9, u64::MAX, 2).await.is_empty());
        let empty = RunId::parse("none").unwrap();
        assert!(walk(&bus, &empty, 1, u64::MAX, 2).await.is_empty());
        // A run whose state says seq 4 but whose history holds nothing (on
        // NATS: every event expired before the state did). Announced only
        // when the bus says seqs up to 4 are gone.
        let mut r = Replay::new(&bus, &empty, 1, u64::MAX, 2).known_head(4);
        assert!(r.next().await.unwrap().is_none(), "not proven gone");
        let expired = Expired(bus, 5);
        let mut r = Replay::new(&expired, &empty, 1, u64::MAX, 2).known_head(4);
        assert!(matches!(
            r.next().await.unwrap(),
            Some(Replayed::Gap { from: 1, to: 4 })
        ));
        assert!(r.next().await.unwrap().is_none());
        assert_eq!(r.next_seq(), 5);
    }

    /// The embedded bus, with every seq below `.1` gone as NATS reports it.
    struct Expired(EmbeddedBus, u64);

    #[async_trait::async_trait]
    impl Bus for Expired {
        async fn publish(&self, run: &RunId, ev: Vec<NewEvent>) -> Result<Vec<u64>, BusError> {
            self.0.publish(run, ev).await
        }
        async fn watch(&self, run: &RunId) -> Result<runcast_bus::Watch, BusError> {
            self.0.watch(run).await
        }
        async fn read(
            &self,
            run: &RunId,
            from: u64,
            limit: usize,
        ) -> Result<runcast_bus::Page, BusError> {
            self.0.read(run, from, limit).await
        }
        async fn state(&self, run: &RunId) -> Result<Option<runcast_core::RunState>, BusError> {
            self.0.state(run).await
        }
        async fn runs(
            &self,
            filter: runcast_bus::RunFilter,
        ) -> Result<Vec<runcast_core::RunState>, BusError> {
            self.0.runs(filter).await
        }
        fn health(&self) -> Result<(), String> {
            self.0.health()
        }
        async fn gone_before(&self) -> Result<u64, BusError> {
            Ok(self.1)
        }
    }
}
