use super::*;

fn outlier(consecutive_5xx: u32, max_ejection_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: consecutive_5xx,
        consecutive_gateway_errors: 0,
        success_rate: None,
        interval: Duration::from_secs(1),
        base_ejection_time: Duration::from_secs(30),
        max_ejection_percent,
    }
}

fn ips(n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| IpAddr::from([10, 2, 0, i])).collect()
}

fn hosts() -> Arc<ServiceHosts> {
    Hosts::default().of(&WorkloadRef::new("prod", "reviews"))
}

/// `n` answers of `outcome` from `ip`; the events they caused.
fn answers(
    hosts: &ServiceHosts,
    ip: IpAddr,
    outcome: Outcome,
    n: u32,
    rule: &OutlierDetection,
    now: Instant,
) -> Vec<Event> {
    (0..n)
        .filter_map(|_| hosts.record(ip, outcome, Some(rule), 3, now))
        .collect()
}

fn ejected_of(candidates: &[Candidate]) -> Vec<IpAddr> {
    candidates
        .iter()
        .filter(|c| c.ejected)
        .map(|c| c.ip)
        .collect()
}

const ERROR: Outcome = Outcome::ServerError { gateway: false };

#[test]
fn consecutive_errors_eject_and_a_success_between_them_resets_the_count() {
    let (hosts, ips, rule, now) = (hosts(), ips(3), outlier(3, 100), Instant::now());
    hosts.candidates(&ips, Some(&rule), now, |_| false);
    assert!(answers(&hosts, ips[0], ERROR, 2, &rule, now).is_empty());
    assert!(answers(&hosts, ips[0], Outcome::Success, 1, &rule, now).is_empty());
    assert!(answers(&hosts, ips[0], ERROR, 2, &rule, now).is_empty());
    let events = answers(&hosts, ips[0], ERROR, 1, &rule, now);
    assert_eq!(
        events,
        [Event::Ejected {
            endpoint: ips[0],
            ejections: 1,
            duration: Duration::from_secs(30),
            reason: "consecutive_5xx",
            ejected: 1,
        }]
    );
    let (candidates, _) = hosts.candidates(&ips, Some(&rule), now, |_| false);
    assert_eq!(ejected_of(&candidates), [ips[0]]);
    // Late answers of requests sent before the ejection change nothing.
    assert!(answers(&hosts, ips[0], ERROR, 10, &rule, now).is_empty());
}

#[test]
fn gateway_errors_count_502_to_504_and_failed_connections_only() {
    let (hosts, ips, now) = (hosts(), ips(3), Instant::now());
    let rule = OutlierDetection {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 2,
        ..outlier(0, 100)
    };
    let gateway = Outcome::ServerError { gateway: true };
    assert!(answers(&hosts, ips[0], ERROR, 10, &rule, now).is_empty());
    assert!(answers(&hosts, ips[0], gateway, 1, &rule, now).is_empty());
    let events = answers(&hosts, ips[0], Outcome::LocalError, 1, &rule, now);
    assert!(matches!(
        events[..],
        [Event::Ejected {
            reason: "consecutive_gateway_errors",
            ..
        }]
    ));
}

#[test]
fn each_ejection_lasts_longer_and_the_endpoint_returns_when_it_is_over() {
    let (hosts, ips, rule) = (hosts(), ips(3), outlier(1, 100));
    let start = Instant::now();
    let base = rule.base_ejection_time;
    hosts.candidates(&ips, Some(&rule), start, |_| false);
    answers(&hosts, ips[1], ERROR, 1, &rule, start);
    // Just before its time: still out.
    let (c, events) = hosts.candidates(
        &ips,
        Some(&rule),
        start + base - Duration::from_millis(1),
        |_| false,
    );
    assert_eq!((ejected_of(&c), events), (vec![ips[1]], vec![]));
    let back = start + base;
    let (c, events) = hosts.candidates(&ips, Some(&rule), back, |_| false);
    assert!(ejected_of(&c).is_empty());
    assert_eq!(
        events,
        [Event::Returned {
            endpoint: ips[1],
            ejections: 1,
            after: base,
            ejected: 0
        }]
    );
    // Ejected again at once: twice as long, then three times.
    let events = answers(&hosts, ips[1], ERROR, 1, &rule, back);
    assert!(
        matches!(events[..], [Event::Ejected { ejections: 2, duration, .. }] if duration == base * 2)
    );
    let again = back + base * 2;
    hosts.candidates(&ips, Some(&rule), again, |_| false);
    let events = answers(&hosts, ips[1], ERROR, 1, &rule, again);
    assert!(
        matches!(events[..], [Event::Ejected { ejections: 3, duration, .. }] if duration == base * 3)
    );
    assert_eq!(
        ejection_time(base, 100),
        Duration::from_secs(300),
        "at most 300 s"
    );
    let long = Duration::from_secs(400);
    assert_eq!(ejection_time(long, 3), long, "unless the base is longer");
}

#[test]
fn the_multiplier_decays_by_one_per_interval_in_service() {
    let (hosts, ips, rule) = (hosts(), ips(3), outlier(1, 100));
    let mut now = Instant::now();
    let base = rule.base_ejection_time;
    hosts.candidates(&ips, Some(&rule), now, |_| false);
    for _ in 0..3 {
        answers(&hosts, ips[0], ERROR, 1, &rule, now);
        now += base * 3;
        hosts.candidates(&ips, Some(&rule), now, |_| false);
    }
    // Ejected 3 times; two intervals in service take 2 off: the next ejection is the 2nd.
    for _ in 0..2 {
        now += rule.interval;
        hosts.candidates(&ips, Some(&rule), now, |_| false);
    }
    let events = answers(&hosts, ips[0], ERROR, 1, &rule, now);
    assert!(
        matches!(events[..], [Event::Ejected { ejections: 2, .. }]),
        "{events:?}"
    );
}

#[test]
fn the_cap_keeps_most_endpoints_in_service_but_one_may_always_go() {
    let (ips, now) = (ips(3), Instant::now());
    assert!(may_eject(0, 3, 10), "one always may");
    assert!(!may_eject(1, 3, 50), "two of three is 67%");
    assert!(may_eject(1, 3, 67));
    assert!(may_eject(2, 3, 100));
    assert!(!may_eject(3, 3, 100));
    assert!(!may_eject(1, 10, 10) && may_eject(1, 10, 20));

    let (hosts, rule) = (hosts(), outlier(1, 50));
    hosts.candidates(&ips, Some(&rule), now, |_| false);
    for ip in &ips {
        answers(&hosts, *ip, ERROR, 1, &rule, now);
    }
    assert_eq!(hosts.ejected(), 1);
    // With every endpoint allowed out, every one goes.
    let (hosts, rule) = (self::hosts(), outlier(1, 100));
    hosts.candidates(&ips, Some(&rule), now, |_| false);
    for ip in &ips {
        answers(&hosts, *ip, ERROR, 1, &rule, now);
    }
    assert_eq!(hosts.ejected(), 3);
}

#[test]
fn without_a_policy_every_ejected_endpoint_returns() {
    let (hosts, ips, rule, now) = (hosts(), ips(3), outlier(1, 100), Instant::now());
    answers(&hosts, ips[2], ERROR, 1, &rule, now);
    assert!(hosts.record(ips[0], ERROR, None, 3, now).is_none());
    let (c, events) = hosts.candidates(&ips, None, now, |_| false);
    assert!(ejected_of(&c).is_empty());
    assert!(matches!(events[..], [Event::Returned { ejected: 0, .. }]));
}

#[test]
fn success_rate_ejects_the_endpoint_far_below_its_peers() {
    let rule = SuccessRate {
        minimum_hosts: 3,
        request_volume: 10,
        stdev_factor: 1000,
    };
    // Rates 1.0, 1.0, 0.95, 0.2 (and one endpoint with too few requests to judge).
    let stats = [(100, 100), (100, 100), (100, 95), (100, 20), (5, 0)];
    assert_eq!(success_rate_outliers(&stats, &rule), [3]);
    // Too few endpoints with enough requests: nobody is judged.
    let few = SuccessRate {
        minimum_hosts: 5,
        ..rule
    };
    assert!(success_rate_outliers(&stats, &few).is_empty());
    assert!(success_rate_outliers(&[(100, 100); 4], &rule).is_empty());

    // At the end of an interval, through the table.
    let (hosts, ips) = (hosts(), ips(4));
    let policy = OutlierDetection {
        success_rate: Some(rule),
        ..outlier(0, 100)
    };
    let now = Instant::now();
    hosts.candidates(&ips, Some(&policy), now, |_| false);
    for (ip, (requests, successes)) in ips.iter().zip(stats) {
        let ok = successes;
        for i in 0..requests {
            let outcome = if i < ok { Outcome::Success } else { ERROR };
            assert!(hosts.record(*ip, outcome, Some(&policy), 4, now).is_none());
        }
    }
    let later = now + policy.interval;
    let (c, events) = hosts.candidates(&ips, Some(&policy), later, |_| false);
    assert_eq!(ejected_of(&c), [ips[3]]);
    assert!(matches!(
        events[..],
        [Event::Ejected {
            reason: "success_rate",
            ..
        }]
    ));
}

#[test]
fn requests_in_flight_are_counted_until_their_guard_goes() {
    let (hosts, ips, now) = (hosts(), ips(2), Instant::now());
    let guards = [hosts.start(ips[1]), hosts.start(ips[1])];
    let (c, _) = hosts.candidates(&ips, None, now, |ip| ip == ips[0]);
    assert_eq!(
        c.iter().map(|c| (c.in_flight, c.local)).collect::<Vec<_>>(),
        [(0, true), (2, false)]
    );
    drop(guards);
    let (c, _) = hosts.candidates(&ips, None, now, |_| false);
    assert_eq!(c[1].in_flight, 0);
    // An endpoint that left the Service is forgotten.
    hosts.candidates(&ips[..1], None, now, |_| false);
    assert_eq!(hosts.table.lock().hosts.len(), 1);
}
