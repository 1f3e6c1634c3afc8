//! Model weights cached on a GPU at layer granularity, with a byte limit and LRU eviction.
//!
//! Every layer of a registered model has a home in pinned host memory (written once, at
//! registration: the model's CPU copy). A layer is *resident* when it also has a GPU segment,
//! loaded from its home by a host → GPU `Transfer`; evicting it releases the GPU segment only
//! (weights are read-only, so nothing is copied back). A model runs only with all its layers
//! resident; [`ModelWeightCache::load_model`] loads the missing ones in layer order, so a
//! caller can start computing on the first layers while the last ones arrive.
//!
//! The LRU list holds resident layers. Using a model touches its layers last to first, so its
//! first layer is the most recent: eviction takes a model's last layers first and leaves the
//! prefix a layer-ordered reload can use. Layers of *pinned* models (serving a batch) are never
//! evicted. Touch, load and release are O(1) a layer; eviction walks from the LRU end past
//! pinned layers.

use serde::{Deserialize, Serialize};

use crate::decision::{Decision, Loc, Refusal, SegmentId};
use crate::executor::Executor;
use crate::place::{DeviceId, Owner, Place, Tier};

/// Most layers one cache tracks (the slab's size).
pub const MAX_LAYERS: usize = 1 << 20;

/// A model served from the cache, numbered from 0 in registration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelId(pub u32);

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Layer {
    model: ModelId,
    bytes: u64,
    home: SegmentId,
    content: u64,
    gpu: Option<SegmentId>,
    prev: u32,
    next: u32,
}

#[derive(Clone, Copy, Debug)]
struct Model {
    first_layer: u32,
    layers: u32,
    resident_layers: u32,
    pins: u32,
    bytes: u64,
}

/// Counters since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightStats {
    pub layers_loaded: u64,
    pub bytes_loaded: u64,
    pub layers_evicted: u64,
    pub bytes_evicted: u64,
    /// Loads refused by the executor (capacity, or a copy whose bytes were wrong).
    pub loads_refused: u64,
}

/// What loading a model did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub layers: u32,
    pub bytes: u64,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct ModelWeightCache {
    device: DeviceId,
    limit_bytes: u64,
    resident_bytes: u64,
    layers: Vec<Layer>,
    models: Vec<Model>,
    /// Most recently used resident layer, and least.
    head: u32,
    tail: u32,
    next_gpu_index: u32,
    stats: WeightStats,
}

impl ModelWeightCache {
    /// A cache of at most `limit_bytes` of weights on `device`'s GPU.
    pub fn new(device: DeviceId, limit_bytes: u64) -> ModelWeightCache {
        ModelWeightCache {
            device,
            limit_bytes,
            resident_bytes: 0,
            layers: Vec::new(),
            models: Vec::new(),
            head: NIL,
            tail: NIL,
            next_gpu_index: 0,
            stats: WeightStats::default(),
        }
    }

    /// Registers a model of these layer sizes and writes its home copy in pinned host memory.
    /// `content` seeds what its bytes hold (distinct models must be given distinct seeds).
    pub fn register(
        &mut self,
        layer_bytes: &[u64],
        content: u64,
        exec: &mut dyn Executor,
    ) -> Result<ModelId, String> {
        if layer_bytes.is_empty() || layer_bytes.contains(&0) {
            return Err("a model needs at least one layer, each of at least 1 byte".into());
        }
        if self.layers.len() + layer_bytes.len() > MAX_LAYERS {
            return Err(format!("more than {MAX_LAYERS} layers in one weight cache"));
        }
        let bytes = layer_bytes
            .iter()
            .try_fold(0u64, |sum, &b| sum.checked_add(b))
            .ok_or("a model of more than 2^64 bytes")?;
        let id = ModelId(self.models.len() as u32);
        let host = Place::new(self.device.0, Tier::PinnedHost);
        let first_layer = self.layers.len() as u32;
        for (i, &layer_bytes) in layer_bytes.iter().enumerate() {
            let home = SegmentId::new(host, Owner::Weights, first_layer + i as u32);
            exec.apply(Decision::Reserve {
                segment: home,
                bytes: layer_bytes,
            })
            .map_err(|r| {
                format!(
                    "model {}: its host copy of {bytes} bytes was refused ({r:?})",
                    id.0
                )
            })?;
            let content = layer_content(content, i as u64);
            exec.apply(Decision::WriteKv {
                at: Loc::at(home),
                bytes: layer_bytes,
                content,
            })
            .expect("a write is never refused");
            self.layers.push(Layer {
                model: id,
                bytes: layer_bytes,
                home,
                content,
                gpu: None,
                prev: NIL,
                next: NIL,
            });
        }
        self.models.push(Model {
            first_layer,
            layers: layer_bytes.len() as u32,
            resident_layers: 0,
            pins: 0,
            bytes,
        });
        Ok(id)
    }

    /// True when every layer of `model` is on the GPU.
    pub fn is_resident(&self, model: ModelId) -> bool {
        let m = self.models[model.0 as usize];
        m.resident_layers == m.layers
    }

    /// Layer `layer` of `model` is on the GPU; touches it when it is.
    pub fn get(&mut self, model: ModelId, layer: u32) -> bool {
        let i = self.layer_index(model, layer);
        let resident = self.layers[i as usize].gpu.is_some();
        if resident {
            self.unlink(i);
            self.push_front(i);
        }
        resident
    }

    /// Makes layer `layer` of `model` resident, evicting least recently used layers of
    /// unpinned models to stay within the limit.
    pub fn put(
        &mut self,
        model: ModelId,
        layer: u32,
        exec: &mut dyn Executor,
    ) -> Result<bool, Refusal> {
        if self.get(model, layer) {
            return Ok(false);
        }
        let i = self.layer_index(model, layer);
        let l = self.layers[i as usize];
        let over = (self.resident_bytes + l.bytes).saturating_sub(self.limit_bytes);
        if over > self.evictable_bytes(Some(model)) || l.bytes > self.limit_bytes {
            self.stats.loads_refused += 1;
            return Err(Refusal::Capacity);
        }
        self.evict_lru_except(over, Some(model), exec);
        let segment = SegmentId::new(
            Place::gpu(self.device.0),
            Owner::Weights,
            self.next_gpu_index,
        );
        if let Err(r) = exec.apply(Decision::Reserve {
            segment,
            bytes: l.bytes,
        }) {
            self.stats.loads_refused += 1;
            return Err(r);
        }
        self.next_gpu_index = self
            .next_gpu_index
            .checked_add(1)
            .expect("fewer than 2^32 layer loads");
        let copy = Decision::Transfer {
            from: Loc::at(l.home),
            to: Loc::at(segment),
            bytes: l.bytes,
            content: l.content,
        };
        if let Err(r) = exec.apply(copy) {
            exec.apply(Decision::Release { segment })
                .expect("a release is never refused");
            self.stats.loads_refused += 1;
            return Err(r);
        }
        self.layers[i as usize].gpu = Some(segment);
        self.models[model.0 as usize].resident_layers += 1;
        self.resident_bytes += l.bytes;
        self.stats.layers_loaded += 1;
        self.stats.bytes_loaded += l.bytes;
        self.push_front(i);
        Ok(true)
    }

    /// Loads every missing layer of `model` in layer order, then touches the whole model.
    /// On a refusal, the layers loaded so far stay.
    pub fn load_model(
        &mut self,
        model: ModelId,
        exec: &mut dyn Executor,
    ) -> Result<Loaded, Refusal> {
        let m = self.models[model.0 as usize];
        let mut loaded = Loaded::default();
        for layer in 0..m.layers {
            if self.put(model, layer, exec)? {
                loaded.layers += 1;
                loaded.bytes += self.layers[(m.first_layer + layer) as usize].bytes;
            }
        }
        self.touch(model);
        Ok(loaded)
    }

    /// Marks `model` used now: its layers become the most recent, its first layer first.
    pub fn touch(&mut self, model: ModelId) {
        let m = self.models[model.0 as usize];
        for layer in (0..m.layers).rev() {
            self.get(model, layer);
        }
    }

    /// A pinned model's layers are never evicted (it is serving). Pins nest.
    pub fn pin(&mut self, model: ModelId) {
        self.models[model.0 as usize].pins += 1;
    }

    pub fn unpin(&mut self, model: ModelId) {
        let m = &mut self.models[model.0 as usize];
        assert!(m.pins > 0, "unpin of an unpinned model");
        m.pins -= 1;
    }

    pub fn is_pinned(&self, model: ModelId) -> bool {
        self.models[model.0 as usize].pins > 0
    }

    /// Evicts least recently used layers of unpinned models until at least `target_bytes` are
    /// freed or none is left; returns the bytes freed.
    pub fn evict_least_recently_used(&mut self, target_bytes: u64, exec: &mut dyn Executor) -> u64 {
        self.evict_lru_except(target_bytes, None, exec)
    }

    /// Releases every resident layer of `model` (it must not be pinned); returns the bytes.
    pub fn unload(&mut self, model: ModelId, exec: &mut dyn Executor) -> u64 {
        assert!(!self.is_pinned(model), "unload of a pinned model");
        let m = self.models[model.0 as usize];
        let mut freed = 0;
        for i in m.first_layer..m.first_layer + m.layers {
            if self.layers[i as usize].gpu.is_some() {
                freed += self.evict_layer(i, exec);
            }
        }
        freed
    }

    fn evict_lru_except(
        &mut self,
        target_bytes: u64,
        keep: Option<ModelId>,
        exec: &mut dyn Executor,
    ) -> u64 {
        let mut freed = 0;
        let mut i = self.tail;
        while freed < target_bytes && i != NIL {
            let l = self.layers[i as usize];
            let prev = l.prev;
            if Some(l.model) != keep && !self.is_pinned(l.model) {
                freed += self.evict_layer(i, exec);
            }
            i = prev;
        }
        freed
    }

    fn evict_layer(&mut self, i: u32, exec: &mut dyn Executor) -> u64 {
        let l = self.layers[i as usize];
        let segment = l.gpu.expect("a resident layer");
        exec.apply(Decision::Release { segment })
            .expect("a release is never refused");
        self.unlink(i);
        self.layers[i as usize].gpu = None;
        self.models[l.model.0 as usize].resident_layers -= 1;
        self.resident_bytes -= l.bytes;
        self.stats.layers_evicted += 1;
        self.stats.bytes_evicted += l.bytes;
        l.bytes
    }

    /// Resident bytes of unpinned models other than `keep`.
    fn evictable_bytes(&self, keep: Option<ModelId>) -> u64 {
        self.models
            .iter()
            .enumerate()
            .filter(|&(id, m)| m.pins == 0 && Some(ModelId(id as u32)) != keep)
            .map(|(id, _)| self.model_resident_bytes(ModelId(id as u32)))
            .sum()
    }

    pub fn model_resident_bytes(&self, model: ModelId) -> u64 {
        let m = self.models[model.0 as usize];
        (m.first_layer..m.first_layer + m.layers)
            .map(|i| &self.layers[i as usize])
            .filter(|l| l.gpu.is_some())
            .map(|l| l.bytes)
            .sum()
    }

    pub fn model_bytes(&self, model: ModelId) -> u64 {
        self.models[model.0 as usize].bytes
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn models(&self) -> impl Iterator<Item = ModelId> {
        (0..self.models.len() as u32).map(ModelId)
    }

    pub fn stats(&self) -> WeightStats {
        self.stats
    }

    /// Resident models, most recently used first (by their first layer's place in the LRU).
    pub fn lru_order(&self) -> Vec<ModelId> {
        let mut order = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let model = self.layers[i as usize].model;
            if !order.contains(&model) {
                order.push(model);
            }
            i = self.layers[i as usize].next;
        }
        order
    }

    fn layer_index(&self, model: ModelId, layer: u32) -> u32 {
        let m = self.models[model.0 as usize];
        assert!(
            layer < m.layers,
            "layer {layer} of a {}-layer model",
            m.layers
        );
        m.first_layer + layer
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        self.layers[i as usize].prev = NIL;
        self.layers[i as usize].next = old;
        if old == NIL {
            self.tail = i;
        } else {
            self.layers[old as usize].prev = i;
        }
        self.head = i;
    }

    fn unlink(&mut self, i: u32) {
        let Layer { prev, next, .. } = self.layers[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.layers[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.layers[next as usize].prev = prev;
        }
        self.layers[i as usize].prev = NIL;
        self.layers[i as usize].next = NIL;
    }

    /// Walks the LRU list and the slab: the list holds exactly the resident layers, the byte and
    /// layer counts agree, and the limit holds.
    pub fn check_invariants(&self) {
        let mut listed = 0usize;
        let mut bytes = 0u64;
        let mut prev = NIL;
        let mut i = self.head;
        while i != NIL {
            let l = &self.layers[i as usize];
            assert!(l.gpu.is_some(), "non-resident layer {i} listed");
            assert_eq!(l.prev, prev, "broken back link at {i}");
            listed += 1;
            bytes += l.bytes;
            assert!(listed <= self.layers.len(), "cycle in the LRU list");
            prev = i;
            i = l.next;
        }
        assert_eq!(self.tail, prev, "tail");
        let resident = self.layers.iter().filter(|l| l.gpu.is_some()).count();
        assert_eq!(listed, resident, "resident layers not all listed");
        assert_eq!(bytes, self.resident_bytes, "resident bytes");
        assert!(self.resident_bytes <= self.limit_bytes, "over the limit");
        for (id, m) in self.models.iter().enumerate() {
            let resident = (m.first_layer..m.first_layer + m.layers)
                .filter(|&i| self.layers[i as usize].gpu.is_some())
                .count() as u32;
            assert_eq!(resident, m.resident_layers, "model {id}'s resident layers");
        }
    }
}

/// What layer `layer` of a model seeded `seed` holds (splitmix64: distinct per layer).
fn layer_content(seed: u64, layer: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(layer.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::books::Books;
    use crate::executor::Ledger;
    use proptest::prelude::*;

    struct Exec(Ledger);

    impl Executor for Exec {
        fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
            let outcome = self.0.books.admits(&d);
            self.0.record(d, outcome);
            outcome
        }
        fn books(&self) -> &Books {
            &self.0.books
        }
        fn digest(&self) -> &crate::digest::Digest {
            &self.0.digest
        }
    }

    fn exec(gpu_bytes: u64) -> Exec {
        Exec(Ledger::new(Books::with_places(&[
            (Place::GPU0, gpu_bytes),
            (Place::new(0, Tier::PinnedHost), u64::MAX / 2),
        ])))
    }

    fn gpu_reserved(x: &Exec) -> u64 {
        x.books().account(Place::GPU0).reserved_bytes
    }

    #[test]
    fn loading_past_the_limit_evicts_the_least_recent_model_last_layers_first() {
        let mut x = exec(1000);
        let mut c = ModelWeightCache::new(DeviceId(0), 100);
        let a = c.register(&[20, 20], 1, &mut x).unwrap();
        let b = c.register(&[30, 30], 2, &mut x).unwrap();
        let d = c.register(&[15], 3, &mut x).unwrap();
        assert_eq!(
            c.load_model(a, &mut x).unwrap(),
            Loaded {
                layers: 2,
                bytes: 40
            }
        );
        assert_eq!(c.load_model(b, &mut x).unwrap().bytes, 60);
        assert_eq!(gpu_reserved(&x), 100);
        // 15 more bytes: a is least recent; its last layer goes first, which frees enough.
        c.load_model(d, &mut x).unwrap();
        assert!(c.get(a, 0), "a's first layer stays");
        assert!(!c.is_resident(a));
        assert_eq!(c.resident_bytes(), 40 + 60 + 15 - 20);
        assert_eq!(gpu_reserved(&x), c.resident_bytes());
        // Reloading a loads only its missing layer, evicting b's last layer (a's own first
        // layer, now least recent, is kept for the model being loaded).
        assert_eq!(c.load_model(a, &mut x).unwrap().layers, 1);
        assert!(c.is_resident(a));
        assert!(c.is_resident(d));
        assert!(c.get(b, 0) && !c.is_resident(b));
        c.check_invariants();
    }

    #[test]
    fn pinned_models_are_never_evicted_and_a_load_that_cannot_fit_is_refused_untouched() {
        let mut x = exec(1000);
        let mut c = ModelWeightCache::new(DeviceId(0), 100);
        let a = c.register(&[60], 1, &mut x).unwrap();
        let b = c.register(&[50], 2, &mut x).unwrap();
        c.load_model(a, &mut x).unwrap();
        c.pin(a);
        assert_eq!(c.load_model(b, &mut x), Err(Refusal::Capacity));
        assert!(c.is_resident(a), "a refused load evicts nothing");
        assert_eq!(c.stats().loads_refused, 1);
        c.unpin(a);
        c.load_model(b, &mut x).unwrap();
        assert!(!c.is_resident(a));
        c.check_invariants();
    }

    #[test]
    fn the_executor_may_refuse_a_load_and_the_cache_stays_consistent() {
        let mut x = exec(50);
        let mut c = ModelWeightCache::new(DeviceId(0), 100);
        let a = c.register(&[40, 40], 1, &mut x).unwrap();
        assert_eq!(c.load_model(a, &mut x), Err(Refusal::Capacity));
        assert!(c.get(a, 0));
        assert!(!c.is_resident(a));
        assert_eq!(gpu_reserved(&x), 40);
        c.check_invariants();
    }

    #[test]
    fn registration_refuses_empty_models_and_zero_layers() {
        let mut x = exec(1000);
        let mut c = ModelWeightCache::new(DeviceId(0), 100);
        assert!(c.register(&[], 1, &mut x).is_err());
        assert!(c.register(&[5, 0], 1, &mut x).is_err());
        assert!(c.register(&[u64::MAX, 1], 1, &mut x).is_err());
    }

    proptest! {
        /// Any sequence of loads, touches, pins and evictions keeps the books, the list and the
        /// limit consistent, and a model that loaded is resident until something evicts it.
        #[test]
        fn any_sequence_keeps_the_cache_consistent(
            sizes in prop::collection::vec(prop::collection::vec(1u64..40, 1..5), 1..6),
            ops in prop::collection::vec((0u8..5, 0usize..6, 0u64..80), 1..120),
            limit in 40u64..200,
        ) {
            let mut x = exec(1 << 40);
            let mut c = ModelWeightCache::new(DeviceId(0), limit);
            let ids: Vec<ModelId> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| c.register(s, i as u64, &mut x).unwrap())
                .collect();
            let mut pinned = vec![0u32; ids.len()];
            for (op, m, n) in ops {
                let k = m % ids.len();
                let id = ids[k];
                match op {
                    0 => {
                        if c.load_model(id, &mut x).is_ok() {
                            prop_assert!(c.is_resident(id));
                        }
                    }
                    1 => c.touch(id),
                    2 => { c.pin(id); pinned[k] += 1; }
                    3 if pinned[k] > 0 => { c.unpin(id); pinned[k] -= 1; }
                    3 => {}
                    _ => {
                        let before: Vec<bool> = ids.iter().map(|&i| c.is_resident(i)).collect();
                        c.evict_least_recently_used(n, &mut x);
                        for (j, &i) in ids.iter().enumerate() {
                            if pinned[j] > 0 {
                                prop_assert_eq!(c.is_resident(i), before[j]);
                            }
                        }
                    }
                }
                c.check_invariants();
                prop_assert_eq!(gpu_reserved(&x), c.resident_bytes());
            }
        }
    }
}
