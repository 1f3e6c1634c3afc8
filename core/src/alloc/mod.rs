//! Allocation strategies over a device address space, behind one trait.
//!
//! A strategy answers `alloc` and `free` with decisions applied through a [`Executor`](crate::executor::Executor); it never
//! touches memory itself. The arena strategies (`first-fit`, `best-fit`, `buddy`, `tlsf`,
//! `pool`) manage one virtual range of `capacity` bytes whose pages they map as their top grows
//! ([`arena::Arena`]); the caching strategies model PyTorch's CUDA caching allocator.
//!
//! Layers, each using only those before it: [`units`] and [`layout`] (what a strategy shows of
//! its memory); [`defrag`] (the compaction planner); [`strategy`] (the [`Allocate`] trait and
//! its vocabulary); [`arena`], [`extents`], [`live`] (what strategies share); the strategies;
//! and this module, which knows them all: [`build`], [`Allocator`], [`AllocatorState`].

pub mod arena;
pub mod bits;
pub mod buddy;
pub mod caching;
pub mod defrag;
pub mod extents;
pub mod fit;
pub mod layout;
pub mod live;
pub mod size_class;
pub mod strategy;
pub mod tlsf;
pub mod units;

use serde::{Deserialize, Serialize};

pub use defrag::Compaction;
pub use layout::{FreeSpace, FreeSummary, LiveBlock, SegmentLayout};
pub use strategy::{AllocConfig, AllocError, AllocRequest, Allocate, Strategy};
pub use units::{align_up, GIB, KIB, MIB};

/// The whole state of a strategy, as a plain value: restoring it resumes the run exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AllocatorState {
    Fit(fit::FitAllocator),
    Buddy(buddy::Buddy),
    Tlsf(tlsf::Tlsf),
    SizeClass(size_class::SizeClassAllocator),
    /// Boxed: the caching allocator keeps far more than the others.
    Caching(Box<caching::Caching>),
}

impl AllocatorState {
    pub fn restore(self) -> Box<dyn Allocator> {
        match self {
            AllocatorState::Fit(a) => Box::new(a),
            AllocatorState::Buddy(a) => Box::new(a),
            AllocatorState::Tlsf(a) => Box::new(a),
            AllocatorState::SizeClass(a) => Box::new(a),
            AllocatorState::Caching(a) => a,
        }
    }
}

/// A strategy whose whole state can be taken as a plain value. Apart from [`Allocate`] so that
/// the strategies need not know [`AllocatorState`], which names them all.
pub trait Allocator: Allocate {
    fn snapshot(&self) -> AllocatorState;

    /// PyTorch's caching allocator, for the drivers that replay a recording of it (restored
    /// state, private pools, pending frees, recorded addresses and segment events); `None` for
    /// every other strategy.
    fn as_caching_mut(&mut self) -> Option<&mut caching::Caching> {
        None
    }
}

impl Allocator for fit::FitAllocator {
    fn snapshot(&self) -> AllocatorState {
        AllocatorState::Fit(self.clone())
    }
}

impl Allocator for buddy::Buddy {
    fn snapshot(&self) -> AllocatorState {
        AllocatorState::Buddy(self.clone())
    }
}

impl Allocator for tlsf::Tlsf {
    fn snapshot(&self) -> AllocatorState {
        AllocatorState::Tlsf(self.clone())
    }
}

impl Allocator for size_class::SizeClassAllocator {
    fn snapshot(&self) -> AllocatorState {
        AllocatorState::SizeClass(self.clone())
    }
}

impl Allocator for caching::Caching {
    fn snapshot(&self) -> AllocatorState {
        AllocatorState::Caching(Box::new(self.clone()))
    }

    fn as_caching_mut(&mut self) -> Option<&mut caching::Caching> {
        Some(self)
    }
}

/// `strategy` with PyTorch's default settings.
pub fn build(strategy: Strategy, config: &AllocConfig) -> Box<dyn Allocator> {
    build_with(strategy, config, &caching::CachingSettings::default())
}

/// `strategy`; the caching strategies take `settings` (`caching-expandable` with expandable
/// segments whatever they say), the others ignore them.
pub fn build_with(
    strategy: Strategy,
    config: &AllocConfig,
    settings: &caching::CachingSettings,
) -> Box<dyn Allocator> {
    match strategy {
        Strategy::Caching => {
            Box::new(caching::Caching::with_settings(config, *settings).named(strategy))
        }
        Strategy::CachingExpandable => {
            let settings = caching::CachingSettings {
                expandable_segments: true,
                ..*settings
            };
            Box::new(caching::Caching::with_settings(config, settings).named(strategy))
        }
        _ => build_other(strategy, config),
    }
}

fn build_other(strategy: Strategy, config: &AllocConfig) -> Box<dyn Allocator> {
    match strategy {
        Strategy::FirstFit => Box::new(fit::FitAllocator::new(fit::FitPolicy::First, config)),
        Strategy::BestFit => Box::new(fit::FitAllocator::new(fit::FitPolicy::Best, config)),
        Strategy::Buddy => Box::new(buddy::Buddy::new(config)),
        Strategy::Tlsf => Box::new(tlsf::Tlsf::new(config)),
        Strategy::SizeClass => Box::new(size_class::SizeClassAllocator::new(config)),
        Strategy::Caching | Strategy::CachingExpandable => {
            unreachable!("build_with builds the caching strategies")
        }
    }
}

#[cfg(test)]
mod tests;
