//! The key space's partitions (`docs/PROTOCOL.md` §8.16): which of the 1,024 partitions a thing belongs to. The
//! workers place partitions on members; a gateway that knows the placement (`ROUTES`) sends a thing's frames to
//! the link of its partition's primary, so both ends must hash names the same way.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Number of partitions of the key space.
pub const PARTITIONS: usize = 1024;

/// Seed of the key → partition hash. Changing it would move every key: it is part of the storage format and of
/// the link format.
const KEY_SEED: u64 = 0x7468_696e_6770_6f72; // "thingpor"

/// The partition a key (a thing's name, as UTF-8 bytes) belongs to: XXH3-64 of the key with seed
/// `0x7468696e67706f72`, modulo 1,024.
pub fn partition_of(key: &[u8]) -> u16 {
    (xxh3_64_with_seed(key, KEY_SEED) % PARTITIONS as u64) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_partitions_the_specification_gives() {
        // docs/PROTOCOL.md §8.16
        assert_eq!(partition_of(b"pump-7"), 337);
        assert!(
            (0..10_000).all(|i| (partition_of(format!("t{i}").as_bytes()) as usize) < PARTITIONS)
        );
    }
}
