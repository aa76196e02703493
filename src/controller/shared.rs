//! One watch per kind per process, shared by every controller's triggers and
//! caches. The reflector writes an event into the store *before* handing it
//! to subscribers, so a reconcile triggered by an event always reads a cache
//! at least as new as that event: two watches of one kind could lag each
//! other, and a reconcile would fold stale data with nothing to re-trigger it
//! until the periodic resync.

use super::index::{Index, KeysOf};
use super::tally::{BucketOf, Tally};
use futures::channel::mpsc;
use futures::{Stream, StreamExt, TryStreamExt};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

/// Events a slow subscriber may fall behind by before the watch waits for it.
const BUFFER: usize = 1024;

/// The shared watch of one kind: its cache and its subscriptions.
pub struct SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store: Store<K>,
    writer: Writer<K>,
    /// Deletions are not broadcast by the reflector (the object is gone from
    /// the store by then); these subscribers get them here.
    deletions: Vec<mpsc::UnboundedSender<Arc<K>>>,
    /// Fed each event before the store: never behind it.
    indexes: Vec<Arc<Index<K>>>,
    /// Fed like the indexes: counts for the objects gauge.
    tallies: Vec<Arc<Tally<K>>>,
}

impl<K> SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn new() -> Self {
        let (store, writer) = reflector::store_shared(BUFFER);
        SharedWatch {
            store,
            writer,
            deletions: Vec::new(),
            indexes: Vec::new(),
            tallies: Vec::new(),
        }
    }

    /// The cache every reader shares.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Objects as they are applied (created or changed), read from the cache.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.writer
            .subscribe()
            .expect("a shared store hands out subscriptions")
    }

    /// Applied objects and, once gone, deleted ones: for mappers that must
    /// react when an object disappears (a permission deleted, a claimant gone).
    pub fn subscribe_with_deletions(&mut self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        self.deletions.push(tx);
        futures::stream::select(self.subscribe(), rx)
    }

    /// A secondary index of this kind, kept from the same events as the cache.
    pub fn index(&mut self, keys_of: KeysOf<K>) -> Arc<Index<K>> {
        let index = Index::new(keys_of);
        self.indexes.push(index.clone());
        index
    }

    /// Counts of this kind by Ready reason, kept from the same events.
    pub fn tally(&mut self, kind: &'static str, bucket_of: BucketOf<K>) -> Arc<Tally<K>> {
        let tally = Tally::new(kind, bucket_of);
        self.tallies.push(tally.clone());
        tally
    }

    /// Drives the watch; runs until the process stops. `strip` drops what the
    /// operator never reads before the object is cached.
    pub fn run(
        self,
        api: Api<K>,
        config: watcher::Config,
        strip: fn(&mut K),
    ) -> impl Future<Output = ()> + Send + 'static {
        let SharedWatch {
            writer,
            deletions,
            indexes,
            tallies,
            ..
        } = self;
        watcher(api, config)
            .default_backoff()
            .modify(strip)
            .map_ok(move |event| {
                for index in &indexes {
                    index.observe(&event);
                }
                for tally in &tallies {
                    tally.observe(&event);
                }
                event
            })
            .reflect_shared(writer)
            .for_each(move |event| {
                if let Ok(watcher::Event::Delete(obj)) = event {
                    let obj = Arc::new(obj);
                    for tx in &deletions {
                        let _ = tx.unbounded_send(obj.clone());
                    }
                }
                futures::future::ready(())
            })
    }
}

impl<K> Default for SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}
