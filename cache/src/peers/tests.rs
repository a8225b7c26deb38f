//! Ownership, backoff and lies, on sets of fake members.

use super::health::backoff;
use super::*;

fn set(self_id: &str, ids: &[&str]) -> PeerSet {
    let s = PeerSet::new(self_id, HttpClients::new(reqwest::Client::new), None);
    s.set_members(
        ids.iter()
            .map(|id| Member {
                id: id.to_string(),
                url: format!("http://{id}"),
            })
            .collect(),
    );
    s
}

#[test]
fn a_failed_peer_waits_at_least_its_attempt_doubling_per_failed_trial() {
    let s = Duration::from_secs;
    assert_eq!(backoff(s(1), 1), PEER_MIN_BACKOFF);
    assert_eq!(
        backoff(s(8), 1),
        s(8),
        "at least as long as the attempt took"
    );
    assert_eq!(backoff(s(1), 2), s(10));
    assert_eq!(backoff(s(8), 3), s(32));
    assert_eq!(backoff(s(1), 30), PEER_MAX_BACKOFF);
    assert_eq!(
        backoff(s(300), 1),
        s(300),
        "the cap never undercuts the attempt"
    );
}

#[test]
fn a_peer_in_backoff_is_passed_over_then_tried_by_one_request() {
    let peers = set("me", &["a"]);
    assert_eq!(peers.admit("a"), Some(false), "a healthy peer is asked");
    peers.record("a", false, Outcome::Failed(Duration::from_millis(1500)));
    assert_eq!(peers.admit("a"), None, "passed over after a failure");
    // Requests under way when it failed fail too: the wait is not doubled.
    peers.record("a", false, Outcome::Failed(Duration::from_millis(1500)));
    let h = peers.health.lock().unwrap()["a"];
    assert_eq!(h.failures, 1);
    // The wait ends: one request tries it, the others still pass it over.
    peers.health.lock().unwrap().get_mut("a").unwrap().until = Instant::now();
    assert_eq!(peers.admit("a"), Some(true));
    assert_eq!(peers.admit("a"), None, "one trial at a time");
    peers.record("a", true, Outcome::Failed(Duration::from_secs(1)));
    let h = peers.health.lock().unwrap()["a"];
    assert_eq!(h.failures, 2);
    assert!(!h.on_trial);
    assert!(h.until > Instant::now() + Duration::from_secs(9), "doubled");
    // A trial given up on at once tells nothing: the next request may try.
    peers.health.lock().unwrap().get_mut("a").unwrap().until = Instant::now();
    let attempt = peers.attempt("a").unwrap();
    assert!(attempt.trial);
    drop(attempt);
    assert_eq!(peers.admit("a"), Some(true));
    // An answer restores it.
    peers.record("a", true, Outcome::Answered);
    assert_eq!(peers.admit("a"), Some(false));
    assert_eq!(peers.stats()["a"].failures, 3);
}

#[test]
fn a_node_that_lies_is_passed_over_alone_and_longer_at_each_lie() {
    let peers = set("me", &["a", "b"]);
    peers.record("a", false, Outcome::Answered);
    peers.distrust("a");
    assert_eq!(peers.admit("a"), None, "the liar is passed over");
    assert_eq!(peers.admit("b"), Some(false), "the others are not");
    let first = peers.health.lock().unwrap()["a"].until;
    // Its trial answers (the transport's view), and lies again: a longer wait.
    peers.health.lock().unwrap().get_mut("a").unwrap().until = Instant::now();
    let trial = peers.attempt("a").unwrap();
    trial.settle(Outcome::Answered);
    peers.distrust("a");
    let h = peers.health.lock().unwrap()["a"];
    assert_eq!(h.failures, 2);
    assert!(h.until > first + Duration::from_secs(4), "doubled");
    // A verified chunk forgets the lies; the next lie starts over.
    peers.vouch("a");
    peers.record("a", false, Outcome::Answered);
    peers.distrust("a");
    assert_eq!(peers.health.lock().unwrap()["a"].failures, 1);
}

#[test]
fn the_fallback_asks_the_next_nodes_after_those_asked_to_fetch() {
    let ids = ["a", "b", "c", "d", "e", "f"];
    let digests: Vec<Digest> = (0..100u32).map(|i| Digest::of(&i.to_be_bytes())).collect();
    let me = set("a", &ids);
    for d in &digests {
        let ranked: Vec<String> = me
            .ranked(d)
            .into_iter()
            .map(|(_, m)| m.map_or("a".to_string(), |m| m.id))
            .collect();
        let fallbacks: Vec<String> = me.fallbacks(d).into_iter().map(|m| m.id).collect();
        let owners: Vec<String> = me.owners(d).into_iter().map(|m| m.id).collect();
        assert_eq!(fallbacks.len(), FALLBACK_NODES);
        assert!(!fallbacks.contains(&"a".to_string()), "never itself");
        assert!(fallbacks.iter().all(|f| !owners.contains(f)));
        if me.owns(d) {
            assert!(owners.is_empty());
            assert_eq!(fallbacks, ranked[1..1 + FALLBACK_NODES]);
        } else {
            let after: Vec<String> = ranked[OWNERS_TRIED..]
                .iter()
                .filter(|id| *id != "a")
                .take(FALLBACK_NODES)
                .cloned()
                .collect();
            assert_eq!(fallbacks, after);
        }
    }
}

#[test]
fn every_node_agrees_on_the_owner_and_a_departure_moves_only_its_chunks() {
    let ids = ["a", "b", "c", "d"];
    let nodes: Vec<PeerSet> = ids.iter().map(|me| set(me, &ids)).collect();
    let digests: Vec<Digest> = (0..200u32).map(|i| Digest::of(&i.to_be_bytes())).collect();
    for d in &digests {
        let owners: Vec<usize> = (0..4).filter(|&n| nodes[n].owns(d)).collect();
        assert_eq!(owners.len(), 1, "exactly one owner per chunk");
    }
    // "d" leaves: the chunks the others owned keep their owner.
    let before: Vec<bool> = digests.iter().map(|d| nodes[0].owns(d)).collect();
    nodes[0].set_members(vec![
        Member {
            id: "b".into(),
            url: "http://b".into(),
        },
        Member {
            id: "c".into(),
            url: "http://c".into(),
        },
    ]);
    for (d, owned) in digests.iter().zip(before) {
        if owned {
            assert!(nodes[0].owns(d), "a chunk of a staying node moved");
        }
    }
}
