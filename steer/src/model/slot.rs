//! Socket slots: where a label's socket of one family and protocol sits in
//! the `sockets` map. The one encoding; steer-common's `socket_slot` is the
//! formula the BPF program computes.

use serde::Serialize;
use steer_common::socket_slot;

use super::net::{Family, Protocol};

/// A label's socket slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Slot {
    pub label: u32,
    pub family: Family,
    pub protocol: Protocol,
}

impl Slot {
    pub fn new(label: u32, family: Family, protocol: Protocol) -> Self {
        Self { label, family, protocol }
    }

    /// Its key in `sockets` and `socket_flags`.
    pub fn index(self) -> u32 {
        socket_slot(self.label, self.family.index(), self.protocol.index())
    }

    pub fn from_index(index: u32) -> Self {
        Self { label: index / 4, family: Family::from_index(index % 4 / 2), protocol: Protocol::from_index(index % 2) }
    }

    /// The four slots of a label.
    pub fn all_of(label: u32) -> impl Iterator<Item = Slot> {
        Family::ALL.into_iter().flat_map(move |f| Protocol::ALL.into_iter().map(move |p| Slot::new(label, f, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_fill_four_per_label() {
        for label in [0, 1, 4095] {
            let slots: Vec<u32> = Slot::all_of(label).map(Slot::index).collect();
            assert_eq!(slots, (label * 4..label * 4 + 4).collect::<Vec<_>>());
            for s in Slot::all_of(label) {
                assert_eq!(Slot::from_index(s.index()), s);
            }
        }
    }
}
