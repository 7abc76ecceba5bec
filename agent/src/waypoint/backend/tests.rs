use std::collections::HashMap;

use http::HeaderValue;

use super::*;

fn backend(name: &str, weight: u32) -> Backend {
    Backend {
        service: ServiceRef {
            name: WorkloadRef::new("default", name),
            port: 80,
        },
        weight,
        filters: Vec::new(),
    }
}

fn candidates(n: u8) -> Vec<Candidate> {
    (1..=n)
        .map(|i| Candidate {
            ip: IpAddr::from([10, 2, 0, i]),
            in_flight: 0,
            ejected: false,
            local: false,
        })
        .collect()
}

/// Which endpoint each of `keys` hashes to among `set`.
fn owners(keys: u64, set: &[Candidate]) -> Vec<IpAddr> {
    (0..keys)
        .map(|k| set[rendezvous(hash_bytes(format!("user-{k}").as_bytes()), set)].ip)
        .collect()
}

#[test]
fn zero_weights_never_win() {
    let backends = [backend("a", 0), backend("b", 1), backend("c", 0)];
    for _ in 0..1000 {
        assert_eq!(pick_weighted(&backends).unwrap().service.name.name, "b");
    }
    assert!(pick_weighted(&[backend("a", 0)]).is_none());
    assert!(pick_weighted(&[]).is_none());
}

#[test]
fn a_key_hashes_the_same_in_every_process() {
    // Fixed values: a change of the hash would move every session of every user.
    assert_eq!(hash_bytes(b""), 0x_f52a_15e9_a9b5_e89b);
    assert_eq!(hash_bytes(b"user-1"), 0x_c499_b5f8_a721_df58);
    let set = candidates(3);
    let first = owners(1000, &set);
    assert_eq!(first, owners(1000, &set), "the same key, the same endpoint");
    let mut spread: HashMap<IpAddr, u32> = HashMap::new();
    for ip in &first {
        *spread.entry(*ip).or_default() += 1;
    }
    // 1000 keys over 3 endpoints: each gets about a third.
    assert!(
        spread.values().all(|n| (250..420).contains(n)),
        "{spread:?}"
    );
}

#[test]
fn adding_an_endpoint_moves_only_the_keys_it_takes_and_removing_one_only_its_own() {
    let three = candidates(3);
    let four = candidates(4);
    let before = owners(10_000, &three);
    let after = owners(10_000, &four);
    let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert!(
        moved.iter().all(|(_, a)| **a == four[3].ip),
        "a moved key goes to the new endpoint only"
    );
    // About a quarter of the keys move, not most of them (as modulo hashing would).
    assert!((2000..3000).contains(&moved.len()), "{} moved", moved.len());

    let two = [three[0], three[2]];
    let fewer = owners(10_000, &two);
    for (b, f) in before.iter().zip(&fewer) {
        if *b != three[1].ip {
            assert_eq!(b, f, "a key of a remaining endpoint stays");
        }
    }
}

#[test]
fn least_of_two_never_picks_the_only_busiest_and_favours_the_idle() {
    let mut set = candidates(4);
    for (c, load) in set.iter_mut().zip([0, 3, 3, 9]) {
        c.in_flight = load;
    }
    let mut rng = fastrand::Rng::with_seed(7);
    let mut picks = [0u32; 4];
    for _ in 0..10_000 {
        picks[least_of_two(&set, &mut rng)] += 1;
    }
    assert_eq!(picks[3], 0, "{picks:?}");
    // The idle one wins every pair it is in: half of all pairs.
    assert!(picks[0] > 4500, "{picks:?}");
    assert_eq!(least_of_two(&set[..1], &mut rng), 0);
}

#[test]
fn round_robin_takes_turns_and_random_and_hash_stay_in_the_set() {
    let set = candidates(3);
    let mut rng = fastrand::Rng::with_seed(1);
    let turns: Vec<_> = (0..6)
        .map(|turn| choose(&LoadBalancer::RoundRobin, &set, None, turn, &mut rng).unwrap())
        .collect();
    let ips: Vec<_> = set.iter().map(|c| c.ip).collect();
    assert_eq!(turns, [ips.clone(), ips.clone()].concat());
    let hashed = LoadBalancer::ConsistentHash(HashKey::SourceIp);
    let key = hash_key(&hashed, &HeaderMap::new(), "10.1.0.7".parse().unwrap());
    let pick = choose(&hashed, &set, key, 0, &mut rng);
    assert!((0..100).all(|turn| choose(&hashed, &set, key, turn, &mut rng) == pick));
    assert!(choose(&LoadBalancer::Random, &[], None, 0, &mut rng).is_none());
}

#[test]
fn ejected_endpoints_are_left_out_unless_all_are_and_close_ones_come_first() {
    let mut set = candidates(3);
    set[0].ejected = true;
    set[2].local = true;
    let (eligible_set, panic) = eligible(&set, false);
    assert_eq!((eligible_set.len(), panic), (2, false));
    assert!(eligible_set.iter().all(|c| !c.ejected));
    let (close, _) = eligible(&set, true);
    assert_eq!(close, [set[2]]);
    // The only local endpoint ejected: the others, not the ejected one.
    set[2].ejected = true;
    assert_eq!(eligible(&set, true).0, [set[1]]);
    // Every endpoint ejected: all of them (panic).
    set[1].ejected = true;
    let (all, panic) = eligible(&set, false);
    assert_eq!((all.len(), panic), (3, true));
}

#[test]
fn hash_keys_come_from_the_header_the_cookie_or_the_client() {
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice"));
    headers.append(header::COOKIE, HeaderValue::from_static("a=1; session=s1 "));
    let source: IpAddr = "10.1.0.7".parse().unwrap();
    let by = |key: HashKey| hash_key(&LoadBalancer::ConsistentHash(key), &headers, source);
    assert_eq!(
        by(HashKey::Header("x-user".into())),
        Some(hash_bytes(b"alice"))
    );
    assert_eq!(
        by(HashKey::Cookie("session".into())),
        Some(hash_bytes(b"s1"))
    );
    assert_eq!(by(HashKey::Cookie("sess".into())), None);
    assert_eq!(by(HashKey::Header("x-none".into())), None);
    assert_eq!(by(HashKey::SourceIp), Some(hash_bytes(&[10, 1, 0, 7])));
    assert_eq!(hash_key(&LoadBalancer::RoundRobin, &headers, source), None);
}
