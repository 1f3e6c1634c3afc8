//! `Books`: the accounts every executor shares — capacity and reserved bytes per place
//! (device and tier), allocated bytes, where each live allocation is — and the check that a
//! decision stream is well formed.

use std::collections::BTreeMap;

use crate::decision::{AllocId, Decision, Loc, Refusal, SegmentId};
use crate::place::Place;

/// Capacity and usage of one place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    pub capacity_bytes: u64,
    pub reserved_bytes: u64,
    pub reserved_bytes_peak: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SegmentBook {
    Physical {
        bytes: u64,
    },
    Virtual {
        bytes: u64,
        mapped: BTreeMap<u64, u64>,
    },
}

impl SegmentBook {
    fn size_bytes(&self) -> u64 {
        match self {
            SegmentBook::Physical { bytes } | SegmentBook::Virtual { bytes, .. } => *bytes,
        }
    }
}

/// Where a live allocation is and its size. Not a `(Loc, u64)`: a place is booked from a
/// decision its policy has just written field by field, and copying the decision's `Loc`
/// whole (one 16-byte load) stalled on store forwarding; with the fields in another order
/// they are copied one by one.
#[derive(Clone, Copy, Debug)]
struct LiveBook {
    offset: u64,
    bytes: u64,
    segment: SegmentId,
}

impl LiveBook {
    #[inline]
    fn new(at: &Loc, bytes: u64) -> LiveBook {
        LiveBook {
            offset: at.offset,
            bytes,
            segment: at.segment,
        }
    }

    #[inline]
    fn loc(self) -> (Loc, u64) {
        let at = Loc {
            segment: self.segment,
            offset: self.offset,
        };
        (at, self.bytes)
    }
}

/// Accounts of one run. Panics on a malformed decision stream: that is a policy bug, never an
/// input error. A place with no capacity given has capacity 0: every reservation there is
/// refused.
#[derive(Clone, Debug)]
pub struct Books {
    /// Every place with a capacity, in order: a run has a few, so a sorted vector is both the
    /// cheapest to walk after every operation and to search.
    accounts: Vec<(Place, Account)>,
    pub allocated_bytes: u64,
    pub allocated_bytes_peak: u64,
    pub live_count: u64,
    segments: BTreeMap<SegmentId, SegmentBook>,
    live: Vec<Option<LiveBook>>,
    /// The last range found backed: a segment and `[start, end)` inside it, all of it mapped
    /// (or the whole of a physical segment). A block inside it needs no search; unmapping or
    /// releasing anything forgets it (mapping only grows ranges).
    backed: Option<(SegmentId, u64, u64)>,
}

impl Books {
    /// Books of one place, device 0's GPU memory, with `capacity_bytes`.
    pub fn new(capacity_bytes: u64) -> Self {
        Self::with_places(&[(Place::GPU0, capacity_bytes)])
    }

    /// Books with the given capacity per place (a place listed twice keeps its last capacity).
    pub fn with_places(capacities: &[(Place, u64)]) -> Self {
        let mut accounts: Vec<(Place, Account)> = Vec::with_capacity(capacities.len());
        for &(place, capacity_bytes) in capacities {
            let account = Account {
                capacity_bytes,
                ..Account::default()
            };
            match accounts.binary_search_by_key(&place, |&(p, _)| p) {
                Ok(i) => accounts[i].1 = account,
                Err(i) => accounts.insert(i, (place, account)),
            }
        }
        Books {
            accounts,
            allocated_bytes: 0,
            allocated_bytes_peak: 0,
            live_count: 0,
            segments: BTreeMap::new(),
            live: Vec::new(),
            backed: None,
        }
    }

    #[inline]
    fn account_mut(&mut self, place: Place) -> Option<&mut Account> {
        self.accounts
            .iter_mut()
            .find(|(p, _)| *p == place)
            .map(|(_, a)| a)
    }

    /// Capacity and usage of `place` (all zero for a place the books were not given).
    #[inline]
    pub fn account(&self, place: Place) -> Account {
        self.accounts
            .iter()
            .find(|(p, _)| *p == place)
            .map_or_else(Account::default, |&(_, a)| a)
    }

    /// Every place with a capacity, in order.
    #[inline]
    pub fn accounts(&self) -> impl Iterator<Item = (Place, Account)> + '_ {
        self.accounts.iter().copied()
    }

    /// Capacity of device 0's GPU memory (the one place of a single-device run).
    pub fn capacity_bytes(&self) -> u64 {
        self.account(Place::GPU0).capacity_bytes
    }

    /// Reserved bytes of device 0's GPU memory.
    pub fn reserved_bytes(&self) -> u64 {
        self.account(Place::GPU0).reserved_bytes
    }

    /// Highest reserved bytes of device 0's GPU memory.
    pub fn reserved_bytes_peak(&self) -> u64 {
        self.account(Place::GPU0).reserved_bytes_peak
    }

    /// Reserved bytes of every tier of `device` together.
    pub fn reserved_bytes_on(&self, device: crate::place::DeviceId) -> u64 {
        self.accounts
            .iter()
            .filter(|(p, _)| p.device == device)
            .map(|(_, a)| a.reserved_bytes)
            .sum()
    }

    /// Where allocation `id` lives now, if it is live.
    pub fn location(&self, id: AllocId) -> Option<(Loc, u64)> {
        self.live
            .get(id.0 as usize)
            .copied()
            .flatten()
            .map(LiveBook::loc)
    }

    /// Live allocations in id order.
    pub fn live(&self) -> impl Iterator<Item = (AllocId, Loc, u64)> + '_ {
        self.live.iter().enumerate().filter_map(|(i, l)| {
            let (loc, bytes) = l.as_ref()?.loc();
            Some((AllocId(i as u64), loc, bytes))
        })
    }

    /// Size of a segment's range (physical bytes, or the virtual range's length).
    pub fn segment_bytes(&self, segment: SegmentId) -> Option<u64> {
        self.segments.get(&segment).map(SegmentBook::size_bytes)
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether the capacity admits `d`, without applying it: an executor asks before it touches
    /// the device, so that a device refusal leaves the books as they were.
    pub fn admits(&self, d: &Decision) -> Result<(), Refusal> {
        let (place, bytes) = match *d {
            Decision::Reserve { segment, bytes } | Decision::Map { segment, bytes, .. } => {
                (segment.place, bytes)
            }
            _ => return Ok(()),
        };
        let a = self.account(place);
        match a.reserved_bytes.checked_add(bytes) {
            Some(after) if after <= a.capacity_bytes => Ok(()),
            _ => Err(Refusal::Capacity),
        }
    }

    fn charge(&mut self, place: Place, bytes: u64) -> Result<(), Refusal> {
        let a = self.account_mut(place).ok_or(Refusal::Capacity)?;
        let after = a
            .reserved_bytes
            .checked_add(bytes)
            .ok_or(Refusal::Capacity)?;
        if after > a.capacity_bytes {
            return Err(Refusal::Capacity);
        }
        a.reserved_bytes = after;
        a.reserved_bytes_peak = a.reserved_bytes_peak.max(after);
        Ok(())
    }

    fn credit(&mut self, place: Place, bytes: u64) {
        let a = self
            .account_mut(place)
            .expect("memory was reserved in this place");
        a.reserved_bytes = a
            .reserved_bytes
            .checked_sub(bytes)
            .expect("more returned than reserved");
    }

    /// Panics unless `[at, at + bytes)` lies in one mapped range of its segment (anywhere in
    /// a physical segment).
    #[inline]
    fn check_backed(&mut self, at: &Loc, bytes: u64) {
        if let Some((segment, start, end)) = self.backed {
            if segment == at.segment && start <= at.offset {
                if let Some(block_end) = at.offset.checked_add(bytes) {
                    if block_end <= end {
                        return;
                    }
                }
            }
        }
        self.backed = Some(self.find_backed(*at, bytes));
    }

    /// [`check_backed`](Self::check_backed) by search: the range that holds the block.
    fn find_backed(&self, at: Loc, bytes: u64) -> (SegmentId, u64, u64) {
        let seg = self
            .segments
            .get(&at.segment)
            .unwrap_or_else(|| panic!("block placed in unknown segment {:?}", at.segment));
        let end = at.offset.checked_add(bytes).expect("block end overflows");
        assert!(
            end <= seg.size_bytes(),
            "block {at:?}+{bytes} outside its segment"
        );
        match seg {
            SegmentBook::Physical { bytes: size } => (at.segment, 0, *size),
            SegmentBook::Virtual { mapped, .. } => {
                let covering = mapped
                    .range(..=at.offset)
                    .next_back()
                    .filter(|&(&start, &len)| start <= at.offset && end <= start + len);
                match covering {
                    Some((&start, &len)) => (at.segment, start, start + len),
                    None => {
                        assert!(
                            bytes == 0,
                            "block {at:?}+{bytes} not inside one mapped range"
                        );
                        (at.segment, at.offset, at.offset)
                    }
                }
            }
        }
    }

    fn map(&mut self, segment: SegmentId, offset: u64, bytes: u64) -> Result<(), Refusal> {
        let Some(SegmentBook::Virtual {
            bytes: size,
            mapped,
        }) = self.segments.get(&segment)
        else {
            panic!("map in {segment:?}, which is not a virtual range");
        };
        let end = offset.checked_add(bytes).expect("map end overflows");
        assert!(end <= *size && bytes > 0, "map outside its range");
        let before = mapped.range(..end).next_back();
        assert!(
            before.is_none_or(|(&s, &l)| s + l <= offset),
            "map over mapped memory"
        );
        self.charge(segment.place, bytes)?;
        let Some(SegmentBook::Virtual { mapped, .. }) = self.segments.get_mut(&segment) else {
            unreachable!()
        };
        // Coalesce with touching neighbours so that a block may span pages mapped separately.
        let mut start = offset;
        let mut len = bytes;
        if let Some((&s, &l)) = mapped.range(..offset).next_back() {
            if s + l == offset {
                mapped.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = mapped.get(&end) {
            mapped.remove(&end);
            len += l;
        }
        mapped.insert(start, len);
        Ok(())
    }

    fn unmap(&mut self, segment: SegmentId, offset: u64, bytes: u64) {
        self.backed = None;
        let Some(SegmentBook::Virtual { mapped, .. }) = self.segments.get_mut(&segment) else {
            panic!("unmap in {segment:?}, which is not a virtual range");
        };
        let end = offset + bytes;
        let (&s, &l) = mapped
            .range(..=offset)
            .next_back()
            .filter(|(&s, &l)| s <= offset && end <= s + l)
            .unwrap_or_else(|| panic!("unmap of memory that is not mapped: {offset}+{bytes}"));
        mapped.remove(&s);
        if s < offset {
            mapped.insert(s, offset - s);
        }
        if end < s + l {
            mapped.insert(end, s + l - end);
        }
        self.credit(segment.place, bytes);
    }

    fn forget_backed(&mut self) -> &mut Self {
        self.backed = None;
        self
    }

    fn set_live(&mut self, id: AllocId, value: Option<LiveBook>) {
        let i = id.0 as usize;
        if i >= self.live.len() {
            self.live.resize(i + 1, None);
        }
        self.live[i] = value;
    }
}

impl Books {
    /// Books `d`: refuses a `Reserve` or `Map` beyond its place's capacity (changing nothing),
    /// and panics on a decision that contradicts the books (a policy bug).
    #[inline]
    pub fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        self.book(&d)
    }

    /// [`apply`](Self::apply) by reference: an executor that also digests and charges the
    /// decision reads it where its caller wrote it instead of copying it for each.
    pub fn book(&mut self, d: &Decision) -> Result<(), Refusal> {
        match *d {
            Decision::Reserve { segment, bytes } => {
                assert!(!self.segments.contains_key(&segment), "{segment:?} reused");
                self.charge(segment.place, bytes)?;
                self.segments
                    .insert(segment, SegmentBook::Physical { bytes });
            }
            Decision::Release { segment } => match self.forget_backed().segments.remove(&segment) {
                Some(SegmentBook::Physical { bytes }) => self.credit(segment.place, bytes),
                other => panic!("release of {segment:?}: {other:?}"),
            },
            Decision::ReserveVa { segment, bytes } => {
                assert!(!self.segments.contains_key(&segment), "{segment:?} reused");
                let mapped = BTreeMap::new();
                self.segments
                    .insert(segment, SegmentBook::Virtual { bytes, mapped });
            }
            Decision::ReleaseVa { segment } => match self.forget_backed().segments.remove(&segment)
            {
                Some(SegmentBook::Virtual { mapped, .. }) => {
                    self.credit(segment.place, mapped.values().sum::<u64>())
                }
                other => panic!("release_va of {segment:?}: {other:?}"),
            },
            Decision::Map {
                segment,
                offset,
                bytes,
            } => self.map(segment, offset, bytes)?,
            Decision::Unmap {
                segment,
                offset,
                bytes,
            } => self.unmap(segment, offset, bytes),
            // The decision's fields are read where the caller wrote them, one by one: copying
            // a `Loc` whole (16 bytes) just after it was written field by field stalls on
            // store forwarding, and that stall was most of the books' time per operation.
            Decision::Place { id, ref at, bytes } => {
                assert!(self.location(id).is_none(), "{id:?} placed twice");
                self.check_backed(at, bytes);
                self.set_live(id, Some(LiveBook::new(at, bytes)));
                self.live_count += 1;
                self.allocated_bytes += bytes;
                self.allocated_bytes_peak = self.allocated_bytes_peak.max(self.allocated_bytes);
            }
            Decision::Free { id, ref at, bytes } => {
                let placed = self.location(id);
                let agrees = matches!(placed, Some((l, b))
                    if b == bytes && l.offset == at.offset && l.segment == at.segment);
                if !agrees {
                    panic!(
                        "free of {id:?}: the books have {placed:?}, the decision says {:?}",
                        Some((*at, bytes))
                    );
                }
                self.set_live(id, None);
                self.live_count -= 1;
                self.allocated_bytes -= bytes;
            }
            Decision::Move {
                id,
                from,
                to,
                bytes,
            } => {
                assert_eq!(self.location(id), Some((from, bytes)), "move of {id:?}");
                self.check_backed(&to, bytes);
                self.set_live(id, Some(LiveBook::new(&to, bytes)));
            }
            Decision::WriteKv { at, bytes, .. } | Decision::ReadKv { at, bytes, .. } => {
                self.check_backed(&at, bytes)
            }
            Decision::Transfer {
                from, to, bytes, ..
            } => {
                self.check_backed(&from, bytes);
                self.check_backed(&to, bytes);
                let disjoint = from.segment != to.segment
                    || from.offset + bytes <= to.offset
                    || to.offset + bytes <= from.offset;
                assert!(disjoint, "transfer onto itself: {from:?} -> {to:?}+{bytes}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_refuses_and_leaves_books_unchanged() {
        let mut books = Books::new(1000);
        let s0 = SegmentId::arena(0);
        assert_eq!(
            books.apply(Decision::Reserve {
                segment: s0,
                bytes: 600
            }),
            Ok(())
        );
        let s1 = SegmentId::arena(1);
        let refused = books.apply(Decision::Reserve {
            segment: s1,
            bytes: 401,
        });
        assert_eq!(refused, Err(Refusal::Capacity));
        assert_eq!(books.reserved_bytes(), 600);
        assert_eq!(books.segment_count(), 1);
        let too_big = books.apply(Decision::Reserve {
            segment: s1,
            bytes: u64::MAX,
        });
        assert_eq!(too_big, Err(Refusal::Capacity));
    }

    #[test]
    fn map_coalesces_and_unmap_splits() {
        let mut books = Books::new(1 << 30);
        let s = SegmentId::arena(3);
        books
            .apply(Decision::ReserveVa {
                segment: s,
                bytes: 1 << 20,
            })
            .unwrap();
        for offset in [0, 4096] {
            let d = Decision::Map {
                segment: s,
                offset,
                bytes: 4096,
            };
            books.apply(d).unwrap();
        }
        // A block spanning both pages is backed because the two mappings touch.
        let at = Loc {
            segment: s,
            offset: 100,
        };
        books
            .apply(Decision::Place {
                id: AllocId(0),
                at,
                bytes: 5000,
            })
            .unwrap();
        books
            .apply(Decision::Free {
                id: AllocId(0),
                at,
                bytes: 5000,
            })
            .unwrap();
        books
            .apply(Decision::Unmap {
                segment: s,
                offset: 0,
                bytes: 4096,
            })
            .unwrap();
        assert_eq!(books.reserved_bytes(), 4096);
        assert_eq!(books.reserved_bytes_peak(), 8192);
        books.apply(Decision::ReleaseVa { segment: s }).unwrap();
        assert_eq!(books.reserved_bytes(), 0);
    }

    #[test]
    #[should_panic(expected = "not inside one mapped range")]
    fn place_in_unmapped_memory_is_a_policy_bug() {
        let mut books = Books::new(1 << 30);
        let s = SegmentId::arena(0);
        books
            .apply(Decision::ReserveVa {
                segment: s,
                bytes: 1 << 20,
            })
            .unwrap();
        let at = Loc {
            segment: s,
            offset: 0,
        };
        let _ = books.apply(Decision::Place {
            id: AllocId(0),
            at,
            bytes: 512,
        });
    }

    #[test]
    #[should_panic(expected = "not inside one mapped range")]
    fn a_block_checked_before_an_unmap_is_checked_again_after_it() {
        let mut books = Books::new(1 << 30);
        let s = SegmentId::arena(0);
        books
            .apply(Decision::ReserveVa {
                segment: s,
                bytes: 1 << 20,
            })
            .unwrap();
        let map = |offset| Decision::Map {
            segment: s,
            offset,
            bytes: 4096,
        };
        books.apply(map(0)).unwrap();
        books.apply(map(4096)).unwrap();
        let at = |offset| Loc { segment: s, offset };
        let place = |id, offset| Decision::Place {
            id: AllocId(id),
            at: at(offset),
            bytes: 512,
        };
        // The first place finds the range [0, 8192) backed; the second is inside it.
        books.apply(place(0, 0)).unwrap();
        books.apply(place(1, 4096)).unwrap();
        books
            .apply(Decision::Free {
                id: AllocId(1),
                at: at(4096),
                bytes: 512,
            })
            .unwrap();
        books
            .apply(Decision::Unmap {
                segment: s,
                offset: 4096,
                bytes: 4096,
            })
            .unwrap();
        let _ = books.apply(place(2, 4096));
    }

    #[test]
    fn a_place_listed_twice_keeps_its_last_capacity_and_places_stay_in_order() {
        use crate::place::{DeviceId, Tier};
        let host = Place {
            device: DeviceId(0),
            tier: Tier::PinnedHost,
        };
        let gpu1 = Place {
            device: DeviceId(1),
            tier: Tier::Gpu,
        };
        let books = Books::with_places(&[(gpu1, 5), (Place::GPU0, 1), (host, 7), (Place::GPU0, 3)]);
        let places: Vec<(Place, u64)> = books
            .accounts()
            .map(|(p, a)| (p, a.capacity_bytes))
            .collect();
        let mut expected = vec![(gpu1, 5), (Place::GPU0, 3), (host, 7)];
        expected.sort();
        assert_eq!(places, expected);
        assert_eq!(books.capacity_bytes(), 3);
    }
}
