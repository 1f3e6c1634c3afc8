//! Closed sets of values (strategies, eviction policies, formats…) written in a spec as the
//! flag spells them: `eviction: "leaf-lru"`, `strategy: ["best-fit", "tlsf"]`. A sweep can then
//! put a flag's value into a spec unchanged, and a misspelt value is refused with the list of
//! known ones.

use std::fmt;
use std::marker::PhantomData;

use gpumem_core::alloc::Strategy;
use gpumem_core::kv::eviction::EvictionKind;
use gpumem_core::kv::offload::OffloadPolicyKind;
use gpumem_traces::serving::WorkloadFormat;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::alloc_replay::DefragMode;
use crate::serve::SchedulingPolicy;

/// A value of a closed set, known by a name.
pub trait Named: Sized + Copy + 'static {
    /// What the set is, for errors: "strategy".
    const WHAT: &'static str;
    /// Every value, in the order errors list them.
    fn all() -> &'static [Self];
    fn name(self) -> &'static str;

    fn from_name(name: &str) -> Result<Self, String> {
        Self::all()
            .iter()
            .copied()
            .find(|v| v.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::all().iter().map(|v| v.name()).collect();
                format!(
                    "unknown {} '{name}'; known: {}",
                    Self::WHAT,
                    known.join(", ")
                )
            })
    }
}

/// A [`Named`] value that serializes as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByName<T>(pub T);

impl<T: Named> Serialize for ByName<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de, T: Named> Deserialize<'de> for ByName<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor<T>(PhantomData<T>);
        impl<T: Named> Visitor<'_> for NameVisitor<T> {
            type Value = ByName<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a {} name in quotes", T::WHAT)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::from_name(v).map(ByName).map_err(E::custom)
            }
        }
        d.deserialize_str(NameVisitor(PhantomData))
    }
}

/// `#[serde(with = "names::one")]`: one value by its name.
pub mod one {
    use super::*;

    pub fn serialize<T: Named, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        ByName(*v).serialize(s)
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        ByName::deserialize(d).map(|b| b.0)
    }
}

/// `#[serde(with = "names::list")]`: a list of values by their names.
pub mod list {
    use super::*;

    pub fn serialize<T: Named, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| ByName(*x)))
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Named> Visitor<'de> for ListVisitor<T> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of {} names", T::WHAT)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(ByName(v)) = seq.next_element::<ByName<T>>()? {
                    out.push(v);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(ListVisitor(PhantomData))
    }
}

impl Named for Strategy {
    const WHAT: &'static str = "strategy";
    fn all() -> &'static [Self] {
        &Strategy::ALL
    }
    fn name(self) -> &'static str {
        Strategy::name(self)
    }
}

impl Named for EvictionKind {
    const WHAT: &'static str = "eviction policy";
    fn all() -> &'static [Self] {
        &EvictionKind::ALL
    }
    fn name(self) -> &'static str {
        EvictionKind::name(self)
    }
}

impl Named for WorkloadFormat {
    const WHAT: &'static str = "trace format";
    fn all() -> &'static [Self] {
        &WorkloadFormat::ALL
    }
    fn name(self) -> &'static str {
        WorkloadFormat::name(self)
    }
}

impl Named for SchedulingPolicy {
    const WHAT: &'static str = "scheduling policy";
    fn all() -> &'static [Self] {
        &[SchedulingPolicy::Fcfs, SchedulingPolicy::Priority]
    }
    fn name(self) -> &'static str {
        match self {
            SchedulingPolicy::Fcfs => "fcfs",
            SchedulingPolicy::Priority => "priority",
        }
    }
}

impl Named for OffloadPolicyKind {
    const WHAT: &'static str = "CPU offload policy";
    fn all() -> &'static [Self] {
        &OffloadPolicyKind::ALL
    }
    fn name(self) -> &'static str {
        OffloadPolicyKind::name(self)
    }
}

impl Named for DefragMode {
    const WHAT: &'static str = "defrag mode";
    fn all() -> &'static [Self] {
        &[DefragMode::Off, DefragMode::OnFailure]
    }
    fn name(self) -> &'static str {
        match self {
            DefragMode::Off => "off",
            DefragMode::OnFailure => "on-failure",
        }
    }
}

impl Named for crate::models::Policy {
    const WHAT: &'static str = "models policy";
    fn all() -> &'static [Self] {
        use crate::models::Policy;
        &[
            Policy::Static,
            Policy::Lru,
            Policy::Offloader,
            Policy::Sleep,
        ]
    }
    fn name(self) -> &'static str {
        crate::models::Policy::name(self)
    }
}

impl Named for gpumem_core::balance::Placement {
    const WHAT: &'static str = "placement";
    fn all() -> &'static [Self] {
        use gpumem_core::balance::Placement;
        &[Placement::Balanced, Placement::Packed]
    }
    fn name(self) -> &'static str {
        gpumem_core::balance::Placement::name(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Named + PartialEq + fmt::Debug>() {
        for &v in T::all() {
            assert_eq!(T::from_name(v.name()), Ok(v));
        }
        let e = T::from_name("no-such-thing").unwrap_err();
        assert!(e.contains(T::WHAT) && e.contains(T::all()[0].name()), "{e}");
    }

    #[test]
    fn every_name_parses_back() {
        round_trip::<Strategy>();
        round_trip::<EvictionKind>();
        round_trip::<WorkloadFormat>();
        round_trip::<SchedulingPolicy>();
        round_trip::<DefragMode>();
        round_trip::<OffloadPolicyKind>();
        round_trip::<crate::models::Policy>();
        round_trip::<gpumem_core::balance::Placement>();
    }

    #[test]
    fn scheduling_policy_names_are_the_flags() {
        for &p in SchedulingPolicy::all() {
            assert_eq!(SchedulingPolicy::parse(p.name()), Ok(p));
        }
    }
}
