//! Combining concurrent small operations into one round trip ("flat combining").
//!
//! Every progress check reads its task row and, later, advances it: two single-row statements.
//! At a few thousand checks a second, the round trips (and the wake-ups on both sides of each)
//! cost more than the statements. A [`Combiner`] lets callers that arrive while a batch is
//! running queue their operation; the next caller to get an executor slot takes everything
//! queued and runs it as one statement. Nobody waits for a timer: an operation that finds a free
//! slot runs at once, alone, so an idle service adds no latency, and under load the batch grows
//! with the rate. No background task is involved: the executing caller is one of the waiters.

use std::future::Future;
use std::sync::Mutex as StdMutex;

use tokio::sync::{oneshot, Semaphore};

/// Queues operations of type `Op` and runs them in batches, handing each caller its `Out`.
#[derive(Debug)]
pub struct Combiner<Op, Out> {
    pending: StdMutex<Vec<(Op, oneshot::Sender<Out>)>>,
    executors: Semaphore,
    max_batch: usize,
}

impl<Op, Out> Combiner<Op, Out> {
    /// At most `executors` batches run at once, each of at most `max_batch` operations.
    pub fn new(executors: usize, max_batch: usize) -> Self {
        Self {
            pending: StdMutex::new(Vec::new()),
            executors: Semaphore::new(executors.max(1)),
            max_batch: max_batch.max(1),
        }
    }

    fn take_batch(&self) -> Vec<(Op, oneshot::Sender<Out>)> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = pending.len().min(self.max_batch);
        pending.drain(..n).collect()
    }

    /// Runs `op`, possibly in a batch with others. `execute` gets a batch and must return one
    /// output per operation, in order. `None` when the caller that executed our batch was
    /// cancelled before it answered (the operation may or may not have run).
    pub async fn run<F, Fut>(&self, op: Op, execute: F) -> Option<Out>
    where
        F: Fn(Vec<Op>) -> Fut,
        Fut: Future<Output = Vec<Out>>,
    {
        let (tx, mut rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((op, tx));
        loop {
            tokio::select! {
                biased;
                out = &mut rx => return out.ok(),
                permit = self.executors.acquire() => {
                    let _permit = permit.ok()?;
                    let batch = self.take_batch();
                    if batch.is_empty() {
                        // Another executor holds our operation: its answer is on the way.
                        return rx.await.ok();
                    }
                    let (ops, replies): (Vec<Op>, Vec<_>) = batch.into_iter().unzip();
                    let outs = execute(ops).await;
                    debug_assert_eq!(outs.len(), replies.len(), "one output per operation");
                    for (reply, out) in replies.into_iter().zip(outs) {
                        // The caller may have gone (cancelled); its answer is not needed.
                        let _ = reply.send(out);
                    }
                    // Ours was in that batch, or is still queued for the next one.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_lone_operation_runs_at_once_alone() {
        let combiner = Combiner::<u32, u32>::new(1, 64);
        let out = combiner
            .run(20, |ops| async move {
                assert_eq!(ops, vec![20]);
                ops.into_iter().map(|o| o + 1).collect()
            })
            .await;
        assert_eq!(out, Some(21));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_operations_share_batches_and_each_gets_its_own_answer() {
        let combiner = Arc::new(Combiner::<u32, u32>::new(1, 16));
        let batches = Arc::new(AtomicUsize::new(0));
        let largest = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let combiner = combiner.clone();
            let batches = batches.clone();
            let largest = largest.clone();
            set.spawn(async move {
                let out = combiner
                    .run(i, |ops| {
                        let batches = batches.clone();
                        let largest = largest.clone();
                        async move {
                            batches.fetch_add(1, Ordering::Relaxed);
                            largest.fetch_max(ops.len(), Ordering::Relaxed);
                            // A round trip's worth of time, so others queue meanwhile.
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            ops.into_iter().map(|o| o * 10).collect()
                        }
                    })
                    .await;
                (i, out)
            });
        }
        while let Some(joined) = set.join_next().await {
            let (i, out) = joined.expect("task");
            assert_eq!(out, Some(i * 10), "operation {i} got its own answer");
        }
        let batches = batches.load(Ordering::Relaxed);
        assert!(batches < 200, "{batches} batches for 200 operations");
        assert!(
            largest.load(Ordering::Relaxed) <= 16,
            "max_batch is honoured"
        );
    }

    #[tokio::test]
    async fn a_cancelled_executor_answers_nobody_and_later_operations_still_run() {
        let combiner = Arc::new(Combiner::<u32, u32>::new(1, 16));
        let mut callers = tokio::task::JoinSet::new();
        // The first caller starts executing a batch that never finishes, then is cancelled.
        let stuck = {
            let combiner = combiner.clone();
            callers.spawn(async move {
                combiner
                    .run(1, |_| std::future::pending::<Vec<u32>>())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        {
            let combiner = combiner.clone();
            callers.spawn(async move { combiner.run(2, |ops| async move { ops }).await });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stuck.abort();
        let mut cancelled = 0;
        let mut answers = Vec::new();
        while let Some(joined) = callers.join_next().await {
            match joined {
                Ok(answer) => answers.push(answer),
                Err(e) => {
                    assert!(e.is_cancelled(), "{e}");
                    cancelled += 1;
                }
            }
        }
        assert_eq!(cancelled, 1, "the stuck executor was cancelled");
        // The waiter was queued, not taken by the stuck batch: it runs once the slot frees.
        assert_eq!(answers, vec![Some(2)]);
        assert_eq!(combiner.run(3, |ops| async move { ops }).await, Some(3));
    }
}
