//! Leases, members, shared views and report bounds.

use super::views::SharedLease;
use super::*;

fn beat(url: &str) -> Heartbeat {
    Heartbeat {
        url: url.into(),
        version: "0".into(),
        replicas: Vec::new(),
        cache_used_bytes: 0,
    }
}

#[test]
fn members_are_bounded_and_replays_refused() {
    let m = Membership::new(2, None);
    m.renew("a", "ka".into(), 10, beat("http://a")).unwrap();
    m.renew("b", "kb".into(), 10, beat("http://b")).unwrap();
    assert!(matches!(
        m.renew("c", "kc".into(), 10, beat("http://c")),
        Err(LeaseError::Full(2))
    ));
    assert!(matches!(
        m.renew("a", "ka".into(), 10, beat("http://evil")),
        Err(LeaseError::Replayed(_))
    ));
    m.renew("a", "ka".into(), 11, beat("http://a2")).unwrap();
    assert_eq!(m.live()[0].url, "http://a2");
    assert!(m.leave("a", 11).is_err());
    assert!(m.leave("a", 12).unwrap());
    assert!(
        m.unsettled().is_none(),
        "a store that knew no one is settled"
    );
}

#[test]
fn a_restarted_store_waits_for_the_members_it_knew() {
    let doc = br#"{"a": {"key": "ka"}, "b": {"key": "kb"}}"#;
    let m = Membership::new(8, Some(doc));
    let (waiting, left) = m.unsettled().unwrap();
    assert_eq!(waiting, ["a", "b"]);
    assert!(left <= SETTLE);
    m.renew("a", "ka".into(), 1, beat("http://a")).unwrap();
    assert_eq!(m.unsettled().unwrap().0, ["b"]);
    m.renew("b", "kb".into(), 1, beat("http://b")).unwrap();
    assert!(m.unsettled().is_none());
}

/// Two servers' views exchanged by hand, as `replica::share_leases` does.
fn exchange(from: &Membership, name: &str, to: &Membership) {
    to.absorb(name, from.view(name));
}

#[test]
fn servers_see_each_others_leases_once_a_view_changed() {
    let (a, b) = (Membership::new(8, None), Membership::new(8, None));
    a.renew("n1", "k1".into(), 10, beat("http://n1")).unwrap();
    exchange(&a, "a", &b);
    assert!(b.live().is_empty(), "a view seen once is not trusted yet");
    exchange(&a, "a", &b);
    let live = b.live();
    assert_eq!((live.len(), live[0].url.as_str()), (1, "http://n1"));
    // The node moves to B: B's newer lease wins on both, and A's older one cannot
    // be replayed to B.
    assert!(matches!(
        b.renew("n1", "k1".into(), 10, beat("http://n1")),
        Err(LeaseError::Replayed(_))
    ));
    b.renew("n1", "k1".into(), 11, beat("http://n1-moved"))
        .unwrap();
    exchange(&b, "b", &a);
    exchange(&b, "b", &a);
    for m in [&a, &b] {
        let live = m.live();
        assert_eq!(live.len(), 1, "one node, not two");
        assert_eq!(live[0].url, "http://n1-moved");
    }
    // A leave through A reaches B; a node over --max-members counts both servers'.
    a.leave("n1", 12).unwrap();
    exchange(&a, "a", &b);
    assert!(a.live().is_empty() && b.live().is_empty());
    let (c, small) = (Membership::new(8, None), Membership::new(1, None));
    c.renew("n2", "k2".into(), 1, beat("http://n2")).unwrap();
    exchange(&c, "c", &small);
    exchange(&c, "c", &small);
    assert!(matches!(
        small.renew("n3", "k3".into(), 1, beat("http://n3")),
        Err(LeaseError::Full(1))
    ));
}

#[test]
fn a_view_ages_on_the_readers_clock_whatever_the_writers_says() {
    let b = Membership::new(8, None);
    // A writer whose wall clock is hours off writes the same ages: only the age a
    // lease had when written counts, plus the time since the reader saw it change.
    let lease = |age_ms| SharedLease {
        id: "n1".into(),
        key: "k1".into(),
        beat: beat("http://n1"),
        last_at_ms: 7_200_000 + 5,
        age_ms,
        left: false,
    };
    let view = |seq, age_ms| LeaseView {
        replica: "a".into(),
        seq,
        leases: vec![lease(age_ms)],
    };
    b.absorb("a", view(1, 0));
    b.absorb("a", view(2, 100));
    assert_eq!(b.live().len(), 1);
    let seen = b.live()[0].last_seen_secs;
    assert!((0.1..1.0).contains(&seen), "{seen}");
    // An old lease in a fresh view is expired all the same.
    b.absorb(
        "a",
        view(3, (HEARTBEAT * MISSED_RENEWALS).as_millis() as u64 + 1),
    );
    assert!(b.live().is_empty());
}

#[test]
fn reports_over_bounds_are_named() {
    let mut b = beat("http://a");
    assert!(b.over_bounds().is_none());
    b.replicas = vec![ReplicaReport::default(); MAX_REPORTED_REPLICAS + 1];
    assert!(b.over_bounds().unwrap().contains("replicas"));
    b.replicas = vec![ReplicaReport {
        users: vec!["u".into(); MAX_USERS_PER_REPLICA + 1],
        ..ReplicaReport::default()
    }];
    assert!(b.over_bounds().unwrap().contains("users"));
}

#[test]
fn phases_cross_the_wire_as_their_names_and_unknown_ones_are_kept() {
    let known = ReplicaReport {
        phase: Phase::Ready.into(),
        ..ReplicaReport::default()
    };
    let json = serde_json::to_value(&known).unwrap();
    assert_eq!(json["phase"], "READY", "the name an older store reads");
    // An older node's report (phase as a string), and a newer node's unknown phase.
    let old: ReplicaReport = serde_json::from_str(
        r#"{"template":"t","phase":"DISTRIBUTING","local_chunks":1,"stored_chunks":2}"#,
    )
    .unwrap();
    assert_eq!(old.phase, ReplicaPhase::Known(Phase::Distributing));
    let beat: Heartbeat = serde_json::from_str(
        r#"{"url":"http://a","version":"9","replicas":[{"template":"t","phase":"VERIFYING","local_chunks":0,"stored_chunks":0}]}"#,
    )
    .expect("an unknown phase must not fail a heartbeat");
    assert_eq!(
        beat.replicas[0].phase,
        ReplicaPhase::Other("VERIFYING".into())
    );
    assert_eq!(
        serde_json::to_value(&beat.replicas[0]).unwrap()["phase"],
        "VERIFYING",
        "shown as the node named it"
    );
    assert!(beat.over_bounds().is_none());
}
