//! Group commit: writes (and reads) of one kind that concurrent requests make, done together.
//!
//! A request hands its item to a [`Batcher`] and waits for its own result. A flusher takes the
//! first item that arrives and every item already queued behind it (up to `max`) and runs them
//! in one go: one statement, one commit, one cache invalidation. Nothing waits for a batch to
//! fill: an item that arrives alone runs at once, alone, so a quiet service pays no latency for
//! it. Under load the items that queued while the previous batch ran form the next one, and a
//! commit's cost is shared by all of them. At most `flushers` batches run at a time.
//!
//! The queue is as long as the requests waiting on it, which the HTTP layer bounds
//! (`http.max_connections`). A request that goes away after handing its item over does not take
//! it back: the item is written with its batch and the result is dropped, as a write already sent
//! to the database would be.
//!
//! Reads by key batch the same way ([`Batcher::for_reads`], [`READ_BATCHES`], [`by_key`]): the
//! lookups that arrive while the previous ones run become one statement, so under load the
//! database parses, plans and answers one statement for many requests (as a pipelining client
//! would have it answer many statements in one wake-up), and a lookup that arrives alone runs at
//! once in its own task.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Runs items of type `I` in batches, each item getting its own `O` back.
pub struct Batcher<I, O> {
    queue: mpsc::UnboundedSender<Job<I, O>>,
    shared: Arc<Shared<I, O>>,
}

/// What the flushers and [`Batcher::submit`] share.
struct Shared<I, O> {
    run: Box<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<O>> + Send + Sync>,
    /// One per batch that may run at once.
    runs: Semaphore,
    /// Items sent and not yet taken by a flusher.
    queued: AtomicUsize,
    /// Reads ([`Batcher::for_reads`]): an item that finds nothing queued and a run free runs
    /// at once in its caller's task.
    inline: bool,
}

struct Job<I, O> {
    item: I,
    reply: oneshot::Sender<O>,
}

/// The batch an item was in ended without a result for it (its run panicked, or the runtime is
/// shutting down). Whether a write was written is unknown, as after a lost connection.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the batch this item was part of ended without its result")]
pub struct Lost;

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `flushers` tasks that run queued items through `run`, at most `max` at a time.
    /// `run` returns one output per item, in the items' order. Must be called inside a Tokio
    /// runtime; the tasks end when the batcher is dropped.
    pub fn new<F, Fut>(flushers: usize, max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        Self::start(flushers, max, false, run)
    }

    /// Like [`Batcher::new`], for reads: an item that arrives when nothing is queued and fewer
    /// than `flushers` batches run is read at once, alone, in its caller's task, which saves
    /// the two hand-overs between tasks that a queued item makes (a quiet service pays nothing
    /// for the batching). Items arriving while every run is busy queue and share the next
    /// batch, as writes do. Only for items whose run may be cancelled with its caller (a read
    /// dropped half-way changes nothing); writes use [`Batcher::new`], which finishes a batch
    /// whatever its requests do.
    pub fn for_reads<F, Fut>(flushers: usize, max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        Self::start(flushers, max, true, run)
    }

    fn start<F, Fut>(flushers: usize, max: usize, inline: bool, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let flushers = flushers.max(1);
        let (queue, jobs) = mpsc::unbounded_channel();
        let jobs = Arc::new(tokio::sync::Mutex::new(jobs));
        let shared = Arc::new(Shared {
            run: Box::new(move |items| run(items).boxed()),
            runs: Semaphore::new(flushers),
            queued: AtomicUsize::new(0),
            inline,
        });
        for _ in 0..flushers {
            tokio::spawn(flush(jobs.clone(), shared.clone(), max.max(1)));
        }
        Self { queue, shared }
    }

    /// Runs `item` with whatever else is queued, and returns its own output.
    pub async fn submit(&self, item: I) -> Result<O, Lost> {
        let shared = &self.shared;
        if shared.inline
            && shared.queued.load(Ordering::Acquire) == 0
            && let Ok(_run) = shared.runs.try_acquire()
        {
            return (shared.run)(vec![item]).await.pop().ok_or(Lost);
        }
        let (reply, output) = oneshot::channel();
        shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(Job { item, reply }).is_err() {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Lost);
        }
        output.await.map_err(|_| Lost)
    }
}

async fn flush<I, O>(
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Job<I, O>>>>,
    shared: Arc<Shared<I, O>>,
    max: usize,
) {
    loop {
        let (batch, run) = {
            // One flusher at a time waits for the next item; the others wait for their turn.
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            // A run of its own (an item read inline may hold one), then everything queued
            // meanwhile.
            let Ok(run) = shared.runs.acquire().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            (batch, run)
        };
        let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) =
            batch.into_iter().map(|job| (job.item, job.reply)).unzip();
        let count = items.len();
        // A run that panics fails its own items (their replies are dropped: `Lost`), not the
        // flusher.
        let outputs = AssertUnwindSafe(async { (shared.run)(items).await })
            .catch_unwind()
            .await;
        drop(run);
        let Ok(outputs) = outputs else {
            continue;
        };
        debug_assert_eq!(outputs.len(), count, "one output per item");
        for (reply, output) in replies.into_iter().zip(outputs) {
            // The request may have gone away; its item was written all the same.
            let _ = reply.send(output);
        }
    }
}

/// How many batches of writes to one database may run at once: two on PostgreSQL (one commits
/// while the next is written), one on SQLite (it has one writer anyway).
pub fn flushers_for(db: &crate::Db) -> usize {
    match db.dialect() {
        crate::db::Dialect::Postgres => 2,
        crate::db::Dialect::Sqlite => 1,
    }
}

/// How many batches of reads of one kind (a primary-key lookup, say) may run at once. Reads do
/// not wait for one another as writes do, so more run together than [`flushers_for`] allows, but
/// few enough that the reads arriving meanwhile queue and share the next statement: at 64
/// requests in flight, statements of about 16 keys instead of 64 statements.
pub const READ_BATCHES: usize = 4;

/// The answers of a batched read by key, in `keys`' order: the row whose `key_of` is each key,
/// or `None` where there was none (a key asked twice gets its row twice).
pub fn by_key<K, V>(keys: &[K], rows: Vec<V>, key_of: impl Fn(&V) -> K) -> Vec<Option<V>>
where
    K: Eq + std::hash::Hash,
    V: Clone,
{
    let mut rows: std::collections::HashMap<K, V> =
        rows.into_iter().map(|row| (key_of(&row), row)).collect();
    let mut out = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        // The last time a key is asked its row moves out; before that it is copied.
        let again = keys[i + 1..].contains(key);
        out.push(if again {
            rows.get(key).cloned()
        } else {
            rows.remove(key)
        });
    }
    out
}

/// Writes a batch's `items` together with `together`, or, when it gives up (`None`: an item it
/// cannot write as asked, a failed statement), each on its own with `alone`, all at once, so each
/// item still gets its own answer and one bad item does not fail the others. A batch of one is
/// written alone. `together` must write all of the items or none (one transaction).
pub async fn together_or_alone<'a, I, O, T, TF, A, AF>(
    items: &'a [I],
    together: T,
    alone: A,
) -> Vec<O>
where
    T: FnOnce(&'a [I]) -> TF,
    TF: Future<Output = Option<Vec<O>>>,
    A: Fn(&'a I) -> AF,
    AF: Future<Output = O>,
{
    if items.len() > 1
        && let Some(outputs) = together(items).await
        && outputs.len() == items.len()
    {
        return outputs;
    }
    futures::future::join_all(items.iter().map(alone)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Submits items 0..n at once, each from its own task, and checks each gets its own output
    /// (ten times the item, as the tests' runs answer).
    async fn submit_together(batcher: &Arc<Batcher<u32, u32>>, n: u32) {
        let all: Vec<_> = (0..n)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { (i, batcher.submit(i).await.expect("output")) })
            })
            .collect();
        for task in all {
            let (i, out) = task.await.expect("task");
            assert_eq!(out, i * 10, "each item gets its own output");
        }
    }

    #[tokio::test]
    async fn an_item_alone_runs_at_once_and_queued_items_share_a_batch() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let batcher = {
            let sizes = sizes.clone();
            Arc::new(Batcher::new(1, 16, move |items: Vec<u32>| {
                let sizes = sizes.clone();
                async move {
                    sizes.lock().expect("lock").push(items.len());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    items.into_iter().map(|i| i * 10).collect::<Vec<_>>()
                }
            }))
        };
        let started = std::time::Instant::now();
        assert_eq!(batcher.submit(1).await.expect("output"), 10);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "not held back"
        );

        submit_together(&batcher, 40).await;
        let sizes = sizes.lock().expect("lock").clone();
        assert_eq!(sizes[0], 1);
        assert_eq!(sizes[1..].iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 16), "at most max: {sizes:?}");
        assert!(sizes.len() <= 1 + 40 / 2, "items shared batches: {sizes:?}");
    }

    #[tokio::test]
    async fn a_read_alone_runs_in_its_callers_task_and_reads_under_load_share_batches() {
        let runs = Arc::new(Mutex::new(Vec::new()));
        let batcher = {
            let runs = runs.clone();
            Arc::new(Batcher::for_reads(2, 16, move |items: Vec<u32>| {
                let runs = runs.clone();
                async move {
                    runs.lock()
                        .expect("lock")
                        .push((tokio::task::try_id(), items.len()));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    items.into_iter().map(|i| i * 10).collect::<Vec<_>>()
                }
            }))
        };
        let alone = batcher.clone();
        let (caller, out) = tokio::spawn(async move { (tokio::task::id(), alone.submit(1).await) })
            .await
            .expect("task");
        assert_eq!(out.expect("output"), 10);
        assert_eq!(
            runs.lock().expect("lock").clone(),
            [(Some(caller), 1)],
            "read at once in the caller's own task"
        );

        runs.lock().expect("lock").clear();
        submit_together(&batcher, 40).await;
        let sizes: Vec<usize> = runs.lock().expect("lock").iter().map(|r| r.1).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| n <= 16), "at most max: {sizes:?}");
        assert!(
            sizes.len() <= 2 + 40 / 8,
            "beyond the two runs at once, reads shared batches: {sizes:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_is_written_together_or_each_item_alone() {
        let alone_calls = Mutex::new(Vec::new());
        let alone = |item: &u32| {
            let item = *item;
            alone_calls.lock().expect("calls").push(item);
            async move { item * 10 }
        };
        let written = together_or_alone(
            &[1, 2, 3],
            |items| async move { Some(items.iter().map(|i| i * 100).collect()) },
            alone,
        )
        .await;
        assert_eq!(written, [100, 200, 300], "together when it can");
        assert!(alone_calls.lock().expect("calls").is_empty());

        let declined = together_or_alone(&[1, 2, 3], |_| async { None }, alone).await;
        assert_eq!(
            declined,
            [10, 20, 30],
            "each alone, in order, when it cannot"
        );
        let short = together_or_alone(&[4, 5], |_| async { Some(vec![400]) }, alone).await;
        assert_eq!(short, [40, 50], "an answer missing for an item: each alone");
        let one =
            together_or_alone(&[6], |_| async { panic!("a batch of one is alone") }, alone).await;
        assert_eq!(one, [60]);
        assert_eq!(*alone_calls.lock().expect("calls"), [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rows_of_a_batched_read_answer_their_keys_in_order() {
        let rows = vec![(3, "c"), (1, "a")];
        assert_eq!(
            by_key(&[1, 2, 3, 1], rows, |row| row.0),
            [Some((1, "a")), None, Some((3, "c")), Some((1, "a"))],
            "in the keys' order, None for a key without a row, a key asked twice answered twice"
        );
        assert!(by_key(&[5], Vec::<(i32, &str)>::new(), |row| row.0) == [None]);
    }

    #[tokio::test]
    async fn a_batch_that_panics_fails_its_items_and_the_next_batch_runs() {
        let batcher = Batcher::new(1, 4, |items: Vec<u32>| async move {
            assert!(!items.contains(&13), "unlucky");
            items
        });
        assert!(batcher.submit(13).await.is_err());
        assert_eq!(batcher.submit(7).await.expect("output"), 7);
    }
}
