//! Per-key concurrency limits for checks: at most `tracking.per_key_concurrency` checks of one
//! virtual key at once, and one check at a time per request (or per key, `serialize_by`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bounded concurrency per key, plus strict serialisation per key when the permit count is 1.
/// Entries are removed when nobody holds or waits for them, so memory follows in-flight work,
/// not the number of tasks.
#[derive(Debug, Default)]
pub(super) struct KeyedLimiter {
    permits: usize,
    map: StdMutex<HashMap<String, Arc<Semaphore>>>,
}

pub(super) struct KeyedPermit<'a> {
    limiter: &'a KeyedLimiter,
    key: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for KeyedPermit<'_> {
    fn drop(&mut self) {
        self.permit.take();
        let mut map = self.limiter.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sem) = map.get(&self.key) {
            // Only our map entry holds it: nobody waits or holds a permit.
            if Arc::strong_count(sem) == 1 {
                map.remove(&self.key);
            }
        }
    }
}

impl KeyedLimiter {
    pub(super) fn new(permits: usize) -> Self {
        Self {
            permits,
            map: StdMutex::new(HashMap::new()),
        }
    }

    pub(super) async fn acquire(&self, key: &str) -> KeyedPermit<'_> {
        let sem = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.permits)))
                .clone()
        };
        let permit = sem.acquire_owned().await.ok();
        KeyedPermit {
            limiter: self,
            key: key.to_owned(),
            permit,
        }
    }
}
