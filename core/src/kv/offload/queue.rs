//! Queues threaded through a slab by index: a member joins at the back and leaves from
//! anywhere, both O(1), with its links kept in its own slab entry (ARC's T1 and T2 through the
//! chunk slots, B1 and B2 through the ghosts). The slab entry says which queue holds it; a
//! queue only knows its ends and its length.

/// No member: a queue's end.
pub const NIL: u32 = u32::MAX;

/// A member's neighbours in its queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub prev: u32,
    pub next: u32,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            prev: NIL,
            next: NIL,
        }
    }
}

/// A slab entry that carries its links.
pub trait Linked {
    fn link(&self) -> &Link;
    fn link_mut(&mut self) -> &mut Link;
}

impl Linked for Link {
    fn link(&self) -> &Link {
        self
    }

    fn link_mut(&mut self) -> &mut Link {
        self
    }
}

/// One queue, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queue {
    head: u32,
    tail: u32,
    len: u64,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

impl Queue {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest member.
    pub fn front(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    /// `i`, in no queue, joins at the back.
    pub fn push_back<T: Linked>(&mut self, slab: &mut [T], i: u32) {
        *slab[i as usize].link_mut() = Link {
            prev: self.tail,
            next: NIL,
        };
        if self.tail == NIL {
            self.head = i;
        } else {
            slab[self.tail as usize].link_mut().next = i;
        }
        self.tail = i;
        self.len += 1;
    }

    /// `i`, a member, leaves; its links are reset.
    pub fn unlink<T: Linked>(&mut self, slab: &mut [T], i: u32) {
        debug_assert!(self.len > 0, "{i} leaves an empty queue");
        let Link { prev, next } = std::mem::take(slab[i as usize].link_mut());
        if prev == NIL {
            self.head = next;
        } else {
            slab[prev as usize].link_mut().next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            slab[next as usize].link_mut().prev = prev;
        }
        self.len -= 1;
    }

    /// The members, oldest first.
    pub fn iter<'a, T: Linked>(&self, slab: &'a [T]) -> impl Iterator<Item = u32> + 'a {
        std::iter::successors(self.front(), move |&i| {
            let next = slab[i as usize].link().next;
            (next != NIL).then_some(next)
        })
    }

    /// The links agree with the ends and the length: each member's `prev` is the one walked
    /// before it, and `is_member` holds for each (checks).
    pub fn check<T: Linked>(
        &self,
        slab: &[T],
        is_member: impl Fn(&T) -> bool,
    ) -> Result<(), String> {
        let (mut prev, mut walked) = (NIL, 0u64);
        for i in self.iter(slab) {
            let entry = &slab[i as usize];
            if !is_member(entry) || entry.link().prev != prev || walked >= self.len {
                return Err(format!("queue: {i} misfiled after {prev}"));
            }
            prev = i;
            walked += 1;
        }
        if walked != self.len || self.tail != prev {
            return Err(format!(
                "queue: walks {walked} members to {prev}, counted {} to {}",
                self.len, self.tail
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    proptest! {
        /// Two queues over one slab against two `VecDeque`s: joins at the back, leaves from
        /// the front, the back and the middle.
        #[test]
        fn agrees_with_deques(ops in prop::collection::vec((0u8..3, 0u32..16, any::<bool>()), 1..300)) {
            let mut slab = vec![Link::default(); 16];
            let mut queues = [Queue::default(); 2];
            let mut model: [VecDeque<u32>; 2] = Default::default();
            for (op, i, second) in ops {
                let q = second as usize;
                let member = model.iter().position(|m| m.contains(&i));
                match (op, member) {
                    (0, None) => {
                        queues[q].push_back(&mut slab, i);
                        model[q].push_back(i);
                    }
                    (1, Some(m)) => {
                        queues[m].unlink(&mut slab, i);
                        model[m].retain(|&x| x != i);
                        prop_assert_eq!(slab[i as usize], Link::default());
                    }
                    (2, _) => {
                        if let Some(front) = queues[q].front() {
                            queues[q].unlink(&mut slab, front);
                            prop_assert_eq!(model[q].pop_front(), Some(front));
                        }
                    }
                    _ => {}
                }
                for q in 0..2 {
                    prop_assert_eq!(queues[q].iter(&slab).collect::<Vec<_>>(), Vec::from(model[q].clone()));
                    prop_assert_eq!(queues[q].len(), model[q].len() as u64);
                    let members = model[q].clone();
                    let is_member = |l: &Link| members.iter().any(|&m| std::ptr::eq(l, &slab[m as usize]));
                    prop_assert_eq!(queues[q].check(&slab, is_member), Ok(()));
                }
            }
        }
    }
}
