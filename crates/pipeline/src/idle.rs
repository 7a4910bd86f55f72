//! Entries that go when unused for a while: a stage's sessions (their KV caches) and the
//! sessions it ended recently. Time is tokio's, so eviction is tested on a paused clock.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Values by session id, each with the time it was last used.
#[derive(Debug)]
pub(crate) struct IdleMap<V> {
    entries: HashMap<u64, (V, Instant)>,
}

impl<V> Default for IdleMap<V> {
    fn default() -> Self {
        IdleMap {
            entries: HashMap::new(),
        }
    }
}

impl<V> IdleMap<V> {
    /// The value of `id`, made by `make` if there is none; used now either way.
    pub(crate) fn use_or_insert_with(&mut self, id: u64, make: impl FnOnce() -> V) -> &mut V {
        let now = Instant::now();
        let entry = self.entries.entry(id).or_insert_with(|| (make(), now));
        entry.1 = now;
        &mut entry.0
    }

    /// Sets the value of `id`, used now.
    pub(crate) fn insert(&mut self, id: u64, value: V) {
        self.entries.insert(id, (value, Instant::now()));
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<V> {
        self.entries.remove(&id).map(|(value, _)| value)
    }

    /// The value of `id`, without counting as a use.
    pub(crate) fn get(&self, id: u64) -> Option<&V> {
        self.entries.get(&id).map(|(value, _)| value)
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    /// Every value, without counting as a use.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.values().map(|(value, _)| value)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Drops every value unused for `timeout` or longer; returns how many went.
    pub(crate) fn evict(&mut self, timeout: Duration) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, (_, used)| used.elapsed() < timeout);
        before - self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_value_goes_after_the_timeout_unless_it_is_used() {
        let mut map = IdleMap::default();
        *map.use_or_insert_with(1, || 10) += 1;
        map.insert(2, 20);
        tokio::time::advance(IDLE / 2).await;
        assert_eq!(map.evict(IDLE), 0, "nothing is idle for the timeout yet");
        // Reading does not count as a use; using does.
        assert_eq!(map.get(1), Some(&11));
        assert_eq!(
            *map.use_or_insert_with(2, || 0),
            20,
            "an existing value is kept"
        );
        tokio::time::advance(IDLE / 2).await;
        assert_eq!(map.evict(IDLE), 1, "1 was last used a whole timeout ago");
        assert!(!map.contains(1) && map.contains(2));
        tokio::time::advance(IDLE / 2 - Duration::from_millis(1)).await;
        assert_eq!(map.evict(IDLE), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(map.evict(IDLE), 1);
        assert_eq!(map.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn removing_and_clearing() {
        let mut map = IdleMap::default();
        map.insert(1, "a");
        map.insert(2, "b");
        assert_eq!(map.remove(1), Some("a"));
        assert_eq!(map.remove(1), None);
        map.clear();
        assert_eq!(map.len(), 0);
    }
}
