//! Placement: wallet id -> shard (fixed hash) and shard -> member (rendezvous hashing).

use xxhash_rust::xxh3::xxh3_64;

use crate::Member;

/// The shard of a wallet: xxh3-64 (seed 0) of the uuid's 16 bytes, modulo `shards`.
///
/// The algorithm is part of the data format: changing it would move every wallet to
/// another shard, so `tests::shard_test_vector` pins it.
pub fn shard_of(wallet_id: &uuid::Uuid, shards: u32) -> u32 {
    // `shards == 0` is rejected by `ClusterConfig::validate`; `max(1)` keeps this total.
    (xxh3_64(wallet_id.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// Rendezvous (highest random weight) score of `member` for `shard`.
fn score(shard: u32, member_id: &str) -> u64 {
    let mut buf = Vec::with_capacity(4 + member_id.len());
    buf.extend_from_slice(&shard.to_be_bytes());
    buf.extend_from_slice(member_id.as_bytes());
    xxh3_64(&buf)
}

/// The owner of `shard` among `members`: the highest score wins, ties go to the
/// greater id so every node picks the same one whatever the order of `members`.
pub fn rendezvous_owner(shard: u32, members: &[Member]) -> Option<&Member> {
    members.iter().max_by(|a, b| {
        score(shard, &a.id)
            .cmp(&score(shard, &b.id))
            .then_with(|| a.id.cmp(&b.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member {
                id: (*id).to_owned(),
                internal_addr: format!("{id}:8090"),
            })
            .collect()
    }

    fn owners(shards: u32, members: &[Member]) -> Vec<String> {
        (0..shards)
            .map(|s| rendezvous_owner(s, members).expect("non-empty").id.clone())
            .collect()
    }

    #[test]
    fn shard_test_vector() {
        // Computed once with xxh3_64 seed 0; must never change between builds.
        let vectors = [
            ("00000000-0000-0000-0000-000000000000", SHARD_VECTOR[0]),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", SHARD_VECTOR[1]),
            ("0191c1b2-7f3e-7c1a-9d2e-3b4a5c6d7e8f", SHARD_VECTOR[2]),
            ("123e4567-e89b-12d3-a456-426614174000", SHARD_VECTOR[3]),
            ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", SHARD_VECTOR[4]),
            ("f47ac10b-58cc-4372-a567-0e02b2c3d479", SHARD_VECTOR[5]),
            ("a8098c1a-f86e-11da-bd1a-00112444be1e", SHARD_VECTOR[6]),
            ("550e8400-e29b-41d4-a716-446655440000", SHARD_VECTOR[7]),
        ];
        // The raw hash too, so a change of algorithm cannot hide behind the modulo.
        let zero = uuid::Uuid::nil();
        assert_eq!(xxh3_64(zero.as_bytes()), 0xd0a6_6a65_c752_8968);
        for (id, shard) in vectors {
            let id = uuid::Uuid::parse_str(id).expect("valid uuid");
            assert_eq!(shard_of(&id, 1024), shard, "shard of {id}");
        }
    }

    const SHARD_VECTOR: [u32; 8] = [360, 787, 204, 1016, 278, 348, 133, 742];

    #[test]
    fn shard_is_in_range() {
        for n in [1, 7, 64, 1024] {
            for _ in 0..100 {
                assert!(shard_of(&uuid::Uuid::new_v4(), n) < n);
            }
        }
    }

    #[test]
    fn owner_does_not_depend_on_member_order() {
        let mut m = members(&["node-0", "node-1", "node-2"]);
        let before = owners(1024, &m);
        m.reverse();
        assert_eq!(owners(1024, &m), before);
        assert!(rendezvous_owner(0, &[]).is_none());
    }

    #[test]
    fn every_member_gets_a_fair_share() {
        let m = members(&["node-0", "node-1", "node-2"]);
        let o = owners(1024, &m);
        for id in ["node-0", "node-1", "node-2"] {
            let n = o.iter().filter(|x| *x == id).count();
            // 1024/3 = 341; allow a wide but still meaningful band.
            assert!((250..=430).contains(&n), "{id} owns {n}");
        }
    }

    #[test]
    fn a_join_moves_about_a_quarter_and_only_to_the_new_member() {
        let three = members(&["node-0", "node-1", "node-2"]);
        let four = members(&["node-0", "node-1", "node-2", "node-3"]);
        let (before, after) = (owners(1024, &three), owners(1024, &four));
        let moved: Vec<usize> = (0..1024).filter(|&i| before[i] != after[i]).collect();
        for &i in &moved {
            assert_eq!(after[i], "node-3", "shard {i} moved to {}", after[i]);
        }
        // 1024/4 = 256 expected.
        assert!((190..=320).contains(&moved.len()), "{} moved", moved.len());
    }

    #[test]
    fn a_leave_moves_only_the_leavers_shards() {
        let three = members(&["node-0", "node-1", "node-2"]);
        let two = members(&["node-0", "node-2"]);
        let (before, after) = (owners(1024, &three), owners(1024, &two));
        for i in 0..1024 {
            if before[i] == "node-1" {
                assert_ne!(after[i], "node-1");
            } else {
                assert_eq!(after[i], before[i], "shard {i} moved needlessly");
            }
        }
    }
}
