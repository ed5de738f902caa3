//! Consumer groups: membership, sticky assignment, hand-over and committed offsets.
//!
//! A partition has a *target* owner (from the assignment) and a *current* owner.
//! When membership changes the assignment is recomputed; a member gives up a
//! partition it no longer targets at its next poll (`revoking`, then commit, then
//! release), and the new target owner takes it only once it is released. So two
//! members never consume one partition at the same time, and the next owner starts
//! exactly at what the previous one committed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actio_core::{BusError, BusErrorKind, Consumer, ConsumerConfig, Offset, Record, RebalanceListener, TopicPartition};
use parking_lot::Mutex;

use crate::Inner;
use crate::log::{Partition, Signal};

type Key = (Arc<str>, i32);

fn key(tp: &TopicPartition) -> Key {
    (tp.topic.clone(), tp.partition)
}

struct Member {
    signal: Arc<Signal>,
    /// ms since the group's epoch of the member's last poll.
    alive: Arc<AtomicU64>,
}

struct GroupState {
    members: BTreeMap<u64, Member>,
    partitions: BTreeMap<Key, Arc<Partition>>,
    committed: HashMap<Key, Offset>,
    owner: HashMap<Key, u64>,
    target: HashMap<Key, u64>,
    retained: HashSet<Key>,
}

pub(crate) struct Group {
    name: String,
    epoch: Instant,
    generation: AtomicU64,
    state: Mutex<GroupState>,
}

impl Group {
    pub(crate) fn new(name: String) -> Self {
        Group {
            name,
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            state: Mutex::new(GroupState {
                members: BTreeMap::new(),
                partitions: BTreeMap::new(),
                committed: HashMap::new(),
                owner: HashMap::new(),
                target: HashMap::new(),
                retained: HashSet::new(),
            }),
        }
    }

    pub(crate) fn committed(&self, topic: &str, partition: i32) -> Option<Offset> {
        self.state.lock().committed.get(&(Arc::from(topic), partition)).copied()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Recomputes targets (sticky: a partition stays with a live target owner while
    /// that owner is within its fair share) and wakes every member.
    fn rebalance(&self, st: &mut GroupState) {
        let members: Vec<u64> = st.members.keys().copied().collect();
        let mut target = HashMap::new();
        if !members.is_empty() {
            let quota = st.partitions.len().div_ceil(members.len());
            let mut count: HashMap<u64, usize> = members.iter().map(|m| (*m, 0)).collect();
            let mut unplaced = Vec::new();
            for k in st.partitions.keys() {
                match st.target.get(k) {
                    Some(m) if count.get(m).is_some_and(|c| *c < quota) => {
                        *count.entry(*m).or_default() += 1;
                        target.insert(k.clone(), *m);
                    }
                    _ => unplaced.push(k.clone()),
                }
            }
            for k in unplaced {
                let m = *members.iter().min_by_key(|m| (count[m], **m)).unwrap_or(&members[0]);
                *count.entry(m).or_default() += 1;
                target.insert(k, m);
            }
        }
        st.target = target;
        self.bump(st);
    }

    fn bump(&self, st: &GroupState) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for m in st.members.values() {
            m.signal.notify();
        }
    }

    /// Removes a member; its partitions are released without commit.
    fn remove(&self, st: &mut GroupState, id: u64) {
        if st.members.remove(&id).is_some() {
            st.owner.retain(|_, o| *o != id);
            for p in st.partitions.values() {
                p.unwatch(id);
            }
            self.rebalance(st);
        }
    }

    fn evict_stale(&self, st: &mut GroupState, session: Duration) {
        let now = self.now_ms();
        let stale: Vec<u64> = st
            .members
            .iter()
            .filter(|(_, m)| now.saturating_sub(m.alive.load(Ordering::Relaxed)) > session.as_millis() as u64)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            tracing::warn!(group = %self.name, member = id, "member evicted: no poll within the session timeout");
            self.remove(st, id);
        }
    }
}

struct Owned {
    part: Arc<Partition>,
    position: Offset,
    paused: bool,
}

/// A member of an embedded consumer group.
pub struct EmbeddedConsumer {
    inner: Arc<Inner>,
    group: Arc<Group>,
    config: ConsumerConfig,
    listener: Arc<dyn RebalanceListener>,
    id: u64,
    signal: Arc<Signal>,
    alive: Arc<AtomicU64>,
    seen_generation: u64,
    last_check: Instant,
    owned: Vec<Owned>,
    next: usize,
    closed: bool,
}

impl std::fmt::Debug for EmbeddedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConsumer").field("group", &self.group.name).field("member", &self.id).finish_non_exhaustive()
    }
}

/// How often a member looks at the group even when nothing changed (evictions).
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Longest single wait inside `poll`, so rebalances are noticed promptly.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Member ids, process-wide.
static NEXT_MEMBER: AtomicU64 = AtomicU64::new(1);

impl EmbeddedConsumer {
    pub(crate) fn join(inner: Arc<Inner>, group: Arc<Group>, config: &ConsumerConfig, listener: Arc<dyn RebalanceListener>) -> Result<Self, BusError> {
        let mut c = EmbeddedConsumer {
            inner,
            group,
            config: config.clone(),
            listener,
            id: 0,
            signal: Arc::new(Signal::default()),
            alive: Arc::new(AtomicU64::new(0)),
            seen_generation: u64::MAX,
            last_check: Instant::now(),
            owned: Vec::new(),
            next: 0,
            closed: false,
        };
        c.enter()?;
        Ok(c)
    }

    fn enter(&mut self) -> Result<(), BusError> {
        let mut parts = Vec::new();
        for t in &self.config.topics {
            parts.extend(self.inner.partitions(t)?);
        }
        let g = self.group.clone();
        let mut st = g.state.lock();
        // Unique across groups, not only within this one: a partition's watchers are
        // the members of every group that reads it (fan-out), told apart by id.
        self.id = NEXT_MEMBER.fetch_add(1, Ordering::Relaxed);
        self.alive.store(g.now_ms(), Ordering::Relaxed);
        st.members.insert(self.id, Member { signal: self.signal.clone(), alive: self.alive.clone() });
        for p in parts {
            let k = key(p.tp());
            if st.retained.insert(k.clone()) {
                let from = st.committed.get(&k).copied().unwrap_or(if self.config.from_earliest { p.start() } else { p.end() });
                p.retain_from(&g.name, from);
            }
            st.partitions.insert(k, p);
        }
        g.rebalance(&mut st);
        Ok(())
    }

    /// Catches up with the group: evictions, revocations, then new assignments.
    fn sync(&mut self) -> Result<(), BusError> {
        let g = self.group.clone();
        self.last_check = Instant::now();
        let (revoke, still_member) = {
            let mut st = g.state.lock();
            g.evict_stale(&mut st, self.inner.config.session_timeout);
            self.seen_generation = g.generation.load(Ordering::Acquire);
            let member = st.members.contains_key(&self.id);
            let revoke: Vec<TopicPartition> = self
                .owned
                .iter()
                .map(|o| o.part.tp().clone())
                .filter(|tp| !member || st.target.get(&key(tp)) != Some(&self.id))
                .collect();
            (revoke, member)
        };
        if !still_member {
            // Evicted while away: the partitions are gone without a commit.
            let lost: Vec<TopicPartition> = self.owned.drain(..).map(|o| o.part.tp().clone()).collect();
            if !lost.is_empty() {
                self.listener.lost(&lost);
            }
            for p in g.state.lock().partitions.values() {
                p.unwatch(self.id);
            }
            return self.enter();
        }
        if !revoke.is_empty() {
            let offsets = self.listener.revoking(&revoke, None);
            let mut st = g.state.lock();
            for (tp, o) in offsets {
                if st.owner.get(&key(&tp)) == Some(&self.id) {
                    Self::store(&g, &mut st, &tp, o);
                }
            }
            for tp in &revoke {
                let k = key(tp);
                if st.owner.get(&k) == Some(&self.id) {
                    st.owner.remove(&k);
                }
                if let Some(p) = st.partitions.get(&k) {
                    p.unwatch(self.id);
                }
            }
            self.owned.retain(|o| !revoke.contains(o.part.tp()));
            g.bump(&st);
            self.seen_generation = g.generation.load(Ordering::Acquire);
        }
        let mut assigned = Vec::new();
        {
            let mut st = g.state.lock();
            let mine: Vec<Key> = st.target.iter().filter(|(k, m)| **m == self.id && !st.owner.contains_key(*k)).map(|(k, _)| k.clone()).collect();
            for k in mine {
                let Some(p) = st.partitions.get(&k).cloned() else { continue };
                st.owner.insert(k.clone(), self.id);
                let position = st.committed.get(&k).copied().unwrap_or(if self.config.from_earliest { p.start() } else { p.end() });
                p.watch(self.id, self.signal.clone());
                assigned.push(p.tp().clone());
                self.owned.push(Owned { part: p, position, paused: false });
            }
        }
        if !assigned.is_empty() {
            assigned.sort();
            self.listener.assigned(&assigned);
        }
        Ok(())
    }

    fn store(g: &Group, st: &mut GroupState, tp: &TopicPartition, o: Offset) {
        let k = key(tp);
        st.committed.insert(k.clone(), o);
        if let Some(p) = st.partitions.get(&k) {
            p.retain_from(&g.name, o);
        }
    }

    fn fetch(&mut self) -> Option<Record> {
        let n = self.owned.len();
        for i in 0..n {
            let idx = (self.next + i) % n;
            let o = &mut self.owned[idx];
            if o.paused {
                continue;
            }
            if let Some(r) = o.part.read(o.position) {
                o.position = r.offset + 1;
                self.next = idx + 1;
                return Some(r);
            }
        }
        None
    }

    fn leave(&mut self) {
        let g = self.group.clone();
        let mut st = g.state.lock();
        g.remove(&mut st, self.id);
        self.owned.clear();
    }
}

impl Consumer for EmbeddedConsumer {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, BusError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.alive.store(self.group.now_ms(), Ordering::Relaxed);
            if self.group.generation.load(Ordering::Acquire) != self.seen_generation || self.last_check.elapsed() >= CHECK_EVERY {
                self.sync()?;
            }
            self.signal.arm();
            if let Some(r) = self.fetch() {
                return Ok(Some(r));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.signal.wait((deadline - now).min(MAX_WAIT));
        }
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError> {
        for o in self.owned.iter_mut().filter(|o| partitions.contains(o.part.tp())) {
            o.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<(), BusError> {
        for o in self.owned.iter_mut().filter(|o| partitions.contains(o.part.tp())) {
            o.paused = false;
        }
        self.signal.notify();
        Ok(())
    }

    fn commit(&mut self, offsets: &[(TopicPartition, Offset)]) -> Result<(), BusError> {
        let g = self.group.clone();
        let mut st = g.state.lock();
        for (tp, o) in offsets {
            let k = key(tp);
            if st.owner.get(&k) != Some(&self.id) {
                return Err(BusError::new(BusErrorKind::Fatal, format!("{tp}: not owned by this member (rebalanced away)")));
            }
            let end = st.partitions.get(&k).map_or(0, |p| p.end());
            if *o > end || *o < 0 {
                return Err(BusError::new(BusErrorKind::Config, format!("{tp}: offset {o} is outside 0..={end}")));
            }
        }
        for (tp, o) in offsets {
            Self::store(&g, &mut st, tp, *o);
        }
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self.owned.iter().map(|o| o.part.tp().clone()).collect();
        v.sort();
        v
    }

    fn close(mut self) -> Result<(), BusError> {
        let all = self.assignment();
        if !all.is_empty() {
            let offsets = self.listener.revoking(&all, None);
            let g = self.group.clone();
            let mut st = g.state.lock();
            for (tp, o) in offsets {
                if st.owner.get(&key(&tp)) == Some(&self.id) {
                    Self::store(&g, &mut st, &tp, o);
                }
            }
        }
        self.leave();
        self.closed = true;
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        if !self.closed {
            // Like a crashed process: partitions go back at the last commit.
            self.leave();
        }
    }
}
