//! Local rate limiting: a token bucket per (policy, target), or per (policy, target,
//! client identity) for `perClient`. A bucket holds at most `maxTokens` and gains
//! `tokensPerFill` every `fillInterval`, continuously; a request takes one token or is
//! refused with how long until the next one.
//!
//! The table is bounded: at `MAX_BUCKETS`, buckets that have refilled to the brim (they
//! remember nothing a new bucket would not) make room; a client that still finds no room
//! is refused (fail closed), as if its bucket were empty.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

use crate::{
    identity::SpiffeId,
    state::{Target, WorkloadRef, traffic::RateLimit},
    sync::Mutex,
};

/// Buckets a waypoint holds at most, all policies together.
pub const MAX_BUCKETS: usize = 10_000;

/// The waypoint's buckets; they live as long as it does, so a reload keeps their levels.
#[derive(Default)]
pub struct Buckets {
    buckets: Mutex<HashMap<Key, Bucket>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    policy: WorkloadRef,
    target: Target,
    client: Option<SpiffeId>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// The limit it was last taken from (a reload may change it).
    limit: RateLimit,
}

/// Why a request was refused: no token until `retry_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

impl Buckets {
    /// Takes a token for a request of `client` from the bucket that `policy`'s `limit`
    /// gives `target`.
    pub fn take(
        &self,
        policy: &WorkloadRef,
        target: &Target,
        limit: &RateLimit,
        client: &SpiffeId,
        now: Instant,
    ) -> Result<(), Limited> {
        let key = Key {
            policy: policy.clone(),
            target: target.clone(),
            client: limit.per_client.then(|| client.clone()),
        };
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(&key) && buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| refill(b, now) < f64::from(b.limit.max_tokens));
            if buckets.len() >= MAX_BUCKETS {
                return Err(Limited {
                    retry_after: limit.fill_interval,
                });
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(limit.max_tokens),
            updated: now,
            limit: *limit,
        });
        bucket.limit = *limit;
        take(bucket, now)
    }

    /// Forgets the buckets of policies no longer in force.
    pub fn retain(&self, keep: impl Fn(&WorkloadRef) -> bool) {
        self.buckets.lock().retain(|k, _| keep(&k.policy));
    }
}

/// Tokens per second.
fn rate(limit: &RateLimit) -> f64 {
    f64::from(limit.tokens_per_fill) / limit.fill_interval.as_secs_f64()
}

/// Brings `bucket` up to `now`; its tokens.
fn refill(bucket: &mut Bucket, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    let full = f64::from(bucket.limit.max_tokens);
    bucket.tokens = (bucket.tokens + elapsed * rate(&bucket.limit)).min(full);
    bucket.updated = now;
    bucket.tokens
}

fn take(bucket: &mut Bucket, now: Instant) -> Result<(), Limited> {
    if refill(bucket, now) >= 1.0 {
        bucket.tokens -= 1.0;
        return Ok(());
    }
    let wait = (1.0 - bucket.tokens) / rate(&bucket.limit);
    Err(Limited {
        retry_after: Duration::from_secs_f64(wait),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max_tokens: u32, per_client: bool) -> RateLimit {
        RateLimit {
            max_tokens,
            tokens_per_fill: max_tokens,
            fill_interval: Duration::from_secs(1),
            per_client,
        }
    }

    fn who(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "prod", sa).unwrap()
    }

    /// Empty buckets, a policy and the Service it targets.
    fn fixture() -> (Buckets, WorkloadRef, Target) {
        let policy = WorkloadRef::new("prod", "limit");
        let target = Target::Service(WorkloadRef::new("prod", "reviews"));
        (Buckets::default(), policy, target)
    }

    #[test]
    fn a_burst_of_max_tokens_passes_then_one_per_refill_step() {
        let (buckets, policy, target) = fixture();
        let limit = limit(10, false);
        let start = Instant::now();
        for _ in 0..10 {
            buckets
                .take(&policy, &target, &limit, &who("a"), start)
                .unwrap();
        }
        let refused = buckets
            .take(&policy, &target, &limit, &who("b"), start)
            .unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        // 100 ms later one token is back, and only one.
        let later = start + Duration::from_millis(100);
        buckets
            .take(&policy, &target, &limit, &who("a"), later)
            .unwrap();
        assert!(
            buckets
                .take(&policy, &target, &limit, &who("a"), later)
                .is_err()
        );
    }

    #[test]
    fn per_client_buckets_are_apart() {
        let (buckets, policy, target) = fixture();
        let limit = limit(1, true);
        let now = Instant::now();
        buckets
            .take(&policy, &target, &limit, &who("a"), now)
            .unwrap();
        assert!(
            buckets
                .take(&policy, &target, &limit, &who("a"), now)
                .is_err()
        );
        buckets
            .take(&policy, &target, &limit, &who("b"), now)
            .unwrap();
    }

    #[test]
    fn a_full_table_makes_room_from_idle_buckets_and_refuses_when_there_is_none() {
        let (buckets, policy, target) = fixture();
        let limit = limit(1, true);
        let now = Instant::now();
        for i in 0..MAX_BUCKETS {
            let client = who(&format!("c{i}"));
            buckets
                .take(&policy, &target, &limit, &client, now)
                .unwrap();
        }
        // Every bucket is empty: no room, the newcomer is refused.
        assert!(
            buckets
                .take(&policy, &target, &limit, &who("new"), now)
                .is_err()
        );
        // A second later they are all full again: they make room.
        let later = now + Duration::from_secs(1);
        buckets
            .take(&policy, &target, &limit, &who("new"), later)
            .unwrap();
        assert_eq!(buckets.buckets.lock().len(), 1);
    }
}
