//! Seeded fault injection for the device executor: which faults a run asks for (`--inject`),
//! and which decisions they hit. Tests use it to prove that every check can fail.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Without an explicit `:N`, an injection hits one of this many first candidates, drawn from
/// the seed.
pub const INJECT_WINDOW: u64 = 64;

/// A seeded fault, as the CLI names it: `corrupt-block[:N]`, `corrupt-transfer[:N]`,
/// `corrupt-offload[:N]`, `corrupt-backup[:N]` or `refuse-alloc[:N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Inject {
    /// Flip one byte of the `nth` block written (1-based, counting `Place`s and `WriteKv`s of
    /// at least one byte) right after it was filled; its next check must report a mismatch.
    CorruptBlock { nth: Option<u64> },
    /// Flip one byte of the destination of the `nth` transfer (1-based, counting `Transfer`s
    /// of at least one byte) right after the copy; the transfer must be refused as mismatched.
    CorruptTransfer { nth: Option<u64> },
    /// Refuse the `nth` `Reserve` or `Map` (1-based, counting those the capacity admits) as if
    /// the device had; it returns `Refusal::Injected`.
    RefuseAlloc { nth: Option<u64> },
    /// Flip one byte of the `nth` copy stored in the KV offload tier (1-based, counting
    /// `Transfer`s of at least one byte into an `Owner::KvOffload` segment) after the copy was
    /// verified: the store counts, and the load that reads it back must be refused. A copy
    /// overwritten unread moves the fault on to the next one.
    CorruptOffload { nth: Option<u64> },
    /// Flip one byte of the `nth` backup stored in host memory (1-based, counting `Transfer`s
    /// of at least one byte from GPU memory into a pinned or pageable host segment that is not
    /// the KV offload tier's: a sleep's backup of weights) after the copy was verified: the
    /// sleep counts, and the wake that restores it must be refused. A backup overwritten
    /// unread moves the fault on to the next one.
    CorruptBackup { nth: Option<u64> },
}

/// Why an `--inject` value could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseInjectError(pub String);

impl fmt::Display for ParseInjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseInjectError {}

impl Inject {
    /// Parses `NAME` or `NAME:N` (N ≥ 1) for the names of [`Inject::NAMES`].
    pub fn parse(s: &str) -> Result<Inject, ParseInjectError> {
        let expected = "expected corrupt-block, corrupt-transfer, corrupt-offload, \
                        corrupt-backup or refuse-alloc, each optionally :N with N a whole number from 1 (e.g. \
                        refuse-alloc:N)";
        let (name, nth) = match s.split_once(':') {
            None => (s, None),
            Some((name, n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => (name, Some(n)),
                _ => {
                    return Err(ParseInjectError(format!(
                        "fault injection `{s}`: `{n}` is not a count from 1; {expected}"
                    )))
                }
            },
        };
        match name {
            "corrupt-block" => Ok(Inject::CorruptBlock { nth }),
            "corrupt-transfer" => Ok(Inject::CorruptTransfer { nth }),
            "corrupt-offload" => Ok(Inject::CorruptOffload { nth }),
            "corrupt-backup" => Ok(Inject::CorruptBackup { nth }),
            "refuse-alloc" => Ok(Inject::RefuseAlloc { nth }),
            _ => Err(ParseInjectError(format!(
                "unknown fault injection `{s}`: {expected}"
            ))),
        }
    }

    pub const NAMES: [&'static str; 5] = [
        "corrupt-block",
        "corrupt-transfer",
        "corrupt-offload",
        "corrupt-backup",
        "refuse-alloc",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Inject::CorruptBlock { .. } => "corrupt-block",
            Inject::CorruptTransfer { .. } => "corrupt-transfer",
            Inject::CorruptOffload { .. } => "corrupt-offload",
            Inject::CorruptBackup { .. } => "corrupt-backup",
            Inject::RefuseAlloc { .. } => "refuse-alloc",
        }
    }

    fn nth(self) -> Option<u64> {
        match self {
            Inject::CorruptBlock { nth }
            | Inject::CorruptTransfer { nth }
            | Inject::CorruptOffload { nth }
            | Inject::CorruptBackup { nth }
            | Inject::RefuseAlloc { nth } => nth,
        }
    }
}

impl FromStr for Inject {
    type Err = ParseInjectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Inject::parse(s)
    }
}

impl fmt::Display for Inject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.nth() {
            Some(n) => write!(f, "{}:{n}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

/// One kind of candidate decision a fault can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// A block written (`Place`, `WriteKv`).
    Write,
    /// A `Transfer`.
    Transfer,
    /// A `Reserve` or `Map` the capacity admits.
    Alloc,
    /// A `Transfer` into the KV offload tier.
    Offload,
    /// A `Transfer` from GPU memory into host memory outside the KV offload tier (a backup).
    Backup,
}

/// Resolved fault injections: which candidates of each kind they hit.
#[derive(Clone, Debug)]
pub(crate) struct Faults {
    pub(crate) rng: ChaCha8Rng,
    hits: [BTreeSet<u64>; 5],
    seen: [u64; 5],
    /// The injections as resolved, e.g. `corrupt-block:17`.
    pub(crate) plan: Vec<String>,
}

impl Faults {
    pub(crate) fn new(faults: &[Inject], seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut hits: [BTreeSet<u64>; 5] = Default::default();
        let mut plan = Vec::new();
        for &f in faults {
            let n = f.nth().unwrap_or_else(|| rng.gen_range(1..=INJECT_WINDOW));
            hits[Self::kind(f) as usize].insert(n);
            plan.push(format!("{}:{n}", f.name()));
        }
        Faults {
            rng,
            hits,
            seen: [0; 5],
            plan,
        }
    }

    fn kind(f: Inject) -> Candidate {
        match f {
            Inject::CorruptBlock { .. } => Candidate::Write,
            Inject::CorruptTransfer { .. } => Candidate::Transfer,
            Inject::RefuseAlloc { .. } => Candidate::Alloc,
            Inject::CorruptOffload { .. } => Candidate::Offload,
            Inject::CorruptBackup { .. } => Candidate::Backup,
        }
    }

    /// Moves a fault of `kind` that came to nothing on to the next candidate of that kind.
    pub(crate) fn rearm(&mut self, kind: Candidate) {
        let i = kind as usize;
        self.hits[i].insert(self.seen[i] + 1);
    }

    /// Counts one more candidate of `kind`; whether a fault hits it.
    pub(crate) fn next(&mut self, kind: Candidate) -> bool {
        let i = kind as usize;
        self.seen[i] += 1;
        self.hits[i].contains(&self.seen[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_parses_the_cli_forms_and_round_trips() {
        let cases = [
            ("corrupt-block", Inject::CorruptBlock { nth: None }),
            ("corrupt-block:3", Inject::CorruptBlock { nth: Some(3) }),
            ("corrupt-transfer", Inject::CorruptTransfer { nth: None }),
            (
                "corrupt-transfer:2",
                Inject::CorruptTransfer { nth: Some(2) },
            ),
            ("refuse-alloc", Inject::RefuseAlloc { nth: None }),
            ("refuse-alloc:1", Inject::RefuseAlloc { nth: Some(1) }),
            ("corrupt-offload", Inject::CorruptOffload { nth: None }),
            ("corrupt-offload:4", Inject::CorruptOffload { nth: Some(4) }),
            ("corrupt-backup", Inject::CorruptBackup { nth: None }),
            ("corrupt-backup:2", Inject::CorruptBackup { nth: Some(2) }),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Inject>(), Ok(want));
            assert_eq!(want.to_string(), text);
        }
        for bad in [
            "",
            "corrupt",
            "corrupt-block:",
            "corrupt-block:0",
            "corrupt-block:-1",
            "corrupt-transfer:x",
            "refuse-alloc:x",
            "refuse-alloc:1:2",
            "Refuse-Alloc",
        ] {
            let err = Inject::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
            assert!(err.contains("refuse-alloc:N"), "{err}");
        }
    }

    #[test]
    fn injections_without_n_are_drawn_from_the_seed() {
        let faults = [
            Inject::CorruptBlock { nth: None },
            Inject::CorruptTransfer { nth: None },
            Inject::RefuseAlloc { nth: None },
            Inject::RefuseAlloc { nth: Some(99) },
        ];
        let a = Faults::new(&faults, 7);
        let b = Faults::new(&faults, 7);
        assert_eq!(a.plan, b.plan);
        assert_eq!(a.plan[3], "refuse-alloc:99");
        for set in &a.hits {
            for n in set.iter().filter(|&&n| n != 99) {
                assert!((1..=INJECT_WINDOW).contains(n));
            }
        }
        let differ = (0..20).any(|s| Faults::new(&faults, s).plan != a.plan);
        assert!(differ, "the seed chooses");
    }

    #[test]
    fn a_fault_hits_exactly_its_candidate_of_its_kind() {
        let mut f = Faults::new(&[Inject::CorruptTransfer { nth: Some(2) }], 0);
        assert!(!f.next(Candidate::Write));
        assert!(!f.next(Candidate::Write));
        assert!(!f.next(Candidate::Transfer));
        assert!(f.next(Candidate::Transfer));
        assert!(!f.next(Candidate::Transfer));
    }
}
