use std::time::Duration;

use super::*;

const LEASE: Duration = Duration::from_secs(90);

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 7420))
}

fn view(max_announced: usize) -> MembershipView {
    MembershipView::new(ViewConfig {
        self_addr: addr(1),
        lease: LEASE,
        max_announced,
    })
}

fn members(view: &MembershipView) -> Vec<(SocketAddr, Source)> {
    view.members().iter().map(|(a, s)| (*a, *s)).collect()
}

fn joined(peer: SocketAddr, source: Source) -> Change {
    Change {
        peer,
        kind: ChangeKind::Joined(source),
    }
}

fn left(peer: SocketAddr, because: LeftBecause) -> Change {
    Change {
        peer,
        kind: ChangeKind::Left(because),
    }
}

/// A join of `peer` heard and confirmed by its probe.
fn announce(view: &mut MembershipView, peer: SocketAddr, incarnation: u64, now: Instant) -> Vec<Change> {
    assert_eq!(view.join_heard(peer, incarnation, now), JoinHeard::Probe);
    view.join_probed(peer, incarnation, ProbeResult::Serving, now)
}

/// A leave of `peer` heard and confirmed by its probe.
fn leave(view: &mut MembershipView, peer: SocketAddr, incarnation: u64, now: Instant) -> Vec<Change> {
    assert_eq!(view.leave_heard(peer, incarnation), LeaveHeard::Probe);
    view.leave_probed(peer, incarnation, ProbeResult::Draining, false, now)
}

#[test]
fn dns_answer_is_the_member_set_without_self() {
    let mut v = view(8);
    let t0 = Instant::now();
    let changes = v.dns_answer([addr(1), addr(2), addr(3)], t0);
    assert_eq!(
        changes,
        vec![joined(addr(2), Source::Dns), joined(addr(3), Source::Dns)]
    );
    assert_eq!(members(&v), vec![(addr(2), Source::Dns), (addr(3), Source::Dns)]);
    let changes = v.dns_answer([addr(1), addr(3)], t0);
    assert_eq!(changes, vec![left(addr(2), LeftBecause::Dns)]);
}

#[test]
fn a_verified_join_is_a_member_before_dns_lists_it() {
    let mut v = view(8);
    let t0 = Instant::now();
    v.dns_answer([addr(2)], t0);
    assert_eq!(v.join_heard(addr(5), 7, t0), JoinHeard::Probe);
    assert!(
        !v.members().contains_key(&addr(5)),
        "not targeted before its probe answered"
    );
    let changes = v.join_probed(addr(5), 7, ProbeResult::Serving, t0);
    assert_eq!(changes, vec![joined(addr(5), Source::Announced)]);
    assert_eq!(v.incarnation(addr(5)), Some(7));
    assert_eq!(v.announced_members().collect::<Vec<_>>(), vec![(addr(5), 7)]);
}

#[test]
fn a_refuted_join_is_not_a_member() {
    for result in [ProbeResult::Refuted, ProbeResult::Draining] {
        let mut v = view(8);
        let t0 = Instant::now();
        assert_eq!(v.join_heard(addr(5), 7, t0), JoinHeard::Probe);
        assert!(v.join_probed(addr(5), 7, result, t0).is_empty(), "{result:?}");
        assert!(v.members().is_empty(), "{result:?} must not make a member");
        assert_eq!(
            v.join_heard(addr(5), 7, t0),
            JoinHeard::Probe,
            "a refuted join may be announced again"
        );
    }
}

#[test]
fn dns_decides_once_it_listed_an_announced_member() {
    let mut v = view(8);
    let t0 = Instant::now();
    announce(&mut v, addr(5), 7, t0);
    let changes = v.dns_answer([addr(5)], t0 + Duration::from_secs(20));
    assert_eq!(changes, vec![joined(addr(5), Source::Dns)], "the source changes");
    // Long past the lease, DNS still lists it: still a member.
    v.tick(t0 + LEASE * 3);
    assert_eq!(members(&v), vec![(addr(5), Source::Dns)]);
    // The pod turned unready: DNS drops it, and the old join does not keep it.
    let changes = v.dns_answer([], t0 + LEASE * 3);
    assert_eq!(changes, vec![left(addr(5), LeftBecause::Dns)]);
    assert!(v.members().is_empty());
}

#[test]
fn dns_dropping_an_announced_member_it_listed_ends_it_even_within_the_lease() {
    let mut v = view(8);
    let t0 = Instant::now();
    announce(&mut v, addr(5), 7, t0);
    v.dns_answer([addr(5)], t0 + Duration::from_secs(1));
    let changes = v.dns_answer([], t0 + Duration::from_secs(2));
    assert_eq!(changes, vec![left(addr(5), LeftBecause::Dns)]);
}

#[test]
fn an_announced_member_dns_never_lists_expires_with_its_lease() {
    let mut v = view(8);
    let t0 = Instant::now();
    announce(&mut v, addr(5), 7, t0);
    assert!(v.tick(t0 + LEASE - Duration::from_millis(1)).is_empty());
    // A repeated announcement of the same incarnation does not renew it.
    assert_eq!(v.join_heard(addr(5), 7, t0 + LEASE / 2), JoinHeard::Known);
    let changes = v.tick(t0 + LEASE);
    assert_eq!(changes, vec![left(addr(5), LeftBecause::LeaseExpired)]);
    assert!(v.members().is_empty());
}

#[test]
fn a_leave_takes_a_dns_member_out_while_stale_dns_still_lists_it() {
    let mut v = view(8);
    let t0 = Instant::now();
    v.dns_answer([addr(2), addr(3)], t0);
    let changes = leave(&mut v, addr(3), 4, t0);
    assert_eq!(changes, vec![left(addr(3), LeftBecause::Announced)]);
    // A stale DNS answer that still lists it does not bring it back.
    assert!(
        v.dns_answer([addr(2), addr(3)], t0 + Duration::from_secs(30))
            .is_empty()
    );
    assert_eq!(members(&v), vec![(addr(2), Source::Dns)]);
    assert_eq!(v.leave_heard(addr(3), 4), LeaveHeard::Known);
    // A late or replayed join of the same incarnation is ignored.
    assert_eq!(
        v.join_heard(addr(3), 4, t0 + Duration::from_secs(31)),
        JoinHeard::AlreadyLeft
    );
    // After the lease DNS decides again (it still lists the address).
    let changes = v.tick(t0 + LEASE);
    assert_eq!(changes, vec![joined(addr(3), Source::Dns)]);
}

#[test]
fn a_forged_leave_does_not_remove_a_serving_replica() {
    let mut v = view(8);
    let t0 = Instant::now();
    v.dns_answer([addr(2)], t0);
    assert_eq!(v.leave_heard(addr(2), 4), LeaveHeard::Probe);
    for result in [ProbeResult::Serving, ProbeResult::Refuted, ProbeResult::Gone] {
        assert!(
            v.leave_probed(addr(2), 4, result, false, t0).is_empty(),
            "{result:?}"
        );
    }
    assert_eq!(members(&v), vec![(addr(2), Source::Dns)]);
}

#[test]
fn the_same_address_with_a_new_incarnation_is_a_new_member() {
    let mut v = view(8);
    let t0 = Instant::now();
    v.dns_answer([addr(3)], t0);
    announce(&mut v, addr(3), 4, t0);
    leave(&mut v, addr(3), 4, t0 + Duration::from_secs(1));
    assert!(v.members().is_empty());
    // The pod's container restarted on the same IP.
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(v.join_heard(addr(3), 9, t1), JoinHeard::Probe);
    assert!(v.members().is_empty(), "not before its probe");
    let changes = v.join_probed(addr(3), 9, ProbeResult::Serving, t1);
    assert_eq!(changes, vec![joined(addr(3), Source::Dns)]);
    assert_eq!(v.incarnation(addr(3)), Some(9));
    // The old incarnation's leave, replayed, cannot take the new one out.
    assert_eq!(v.leave_heard(addr(3), 4), LeaveHeard::Probe);
    assert!(
        v.leave_probed(addr(3), 4, ProbeResult::Draining, false, t1)
            .is_empty()
    );
}

#[test]
fn a_leave_of_an_announced_member_ends_it() {
    let mut v = view(8);
    let t0 = Instant::now();
    announce(&mut v, addr(5), 7, t0);
    let changes = leave(&mut v, addr(5), 7, t0 + Duration::from_secs(1));
    assert_eq!(changes, vec![left(addr(5), LeftBecause::Announced)]);
    assert_eq!(
        v.join_heard(addr(5), 7, t0 + Duration::from_secs(2)),
        JoinHeard::AlreadyLeft
    );
}

#[test]
fn announced_addresses_are_bounded_and_dns_members_do_not_count() {
    let mut v = view(2);
    let t0 = Instant::now();
    v.dns_answer([addr(2)], t0);
    announce(&mut v, addr(5), 1, t0);
    // Waiting for its probe counts too.
    assert_eq!(v.join_heard(addr(6), 1, t0), JoinHeard::Probe);
    assert_eq!(v.join_heard(addr(7), 1, t0), JoinHeard::TooMany);
    // A replica DNS lists may always announce itself.
    assert_eq!(v.join_heard(addr(2), 3, t0), JoinHeard::Probe);
    // A new incarnation of an announced address replaces it.
    assert_eq!(v.join_heard(addr(5), 2, t0), JoinHeard::Probe);
    // Once DNS lists one of them, there is room again.
    v.dns_answer([addr(2), addr(5)], t0);
    assert_eq!(v.join_heard(addr(7), 1, t0), JoinHeard::Probe);
}

#[test]
fn an_unreachable_announced_member_is_dropped_but_a_dns_member_is_not() {
    let mut v = view(8);
    let t0 = Instant::now();
    v.dns_answer([addr(2)], t0);
    announce(&mut v, addr(5), 7, t0);
    assert!(
        v.unreachable(addr(2), t0).is_empty(),
        "DNS members are left to the failure path"
    );
    let changes = v.unreachable(addr(5), t0);
    assert_eq!(changes, vec![left(addr(5), LeftBecause::Unreachable)]);
    assert_eq!(members(&v), vec![(addr(2), Source::Dns)]);
}

#[test]
fn announcements_about_this_replica_are_refused() {
    let mut v = view(8);
    let t0 = Instant::now();
    assert_eq!(v.join_heard(addr(1), 1, t0), JoinHeard::IsSelf);
    assert_eq!(v.leave_heard(addr(1), 1), LeaveHeard::IsSelf);
    assert!(v.members().is_empty());
}

#[test]
fn a_probe_for_a_superseded_join_changes_nothing() {
    let mut v = view(8);
    let t0 = Instant::now();
    assert_eq!(v.join_heard(addr(5), 1, t0), JoinHeard::Probe);
    assert_eq!(v.join_heard(addr(5), 2, t0), JoinHeard::Probe);
    assert!(v.join_probed(addr(5), 1, ProbeResult::Serving, t0).is_empty());
    assert!(v.members().is_empty(), "incarnation 2 is still unproven");
    assert_eq!(
        v.join_probed(addr(5), 2, ProbeResult::Serving, t0),
        vec![joined(addr(5), Source::Announced)]
    );
}

#[test]
fn a_reported_leave_counts_when_the_replica_is_draining_or_gone() {
    let mut v = view(8);
    let t0 = Instant::now();
    // A joiner's stale DNS answer still lists two replicas that left.
    v.dns_answer([addr(2), addr(3), addr(4)], t0);
    for (peer, result) in [(addr(2), ProbeResult::Gone), (addr(3), ProbeResult::Draining)] {
        assert_eq!(v.leave_heard(peer, 5), LeaveHeard::Probe);
        let changes = v.leave_probed(peer, 5, result, true, t0);
        assert_eq!(changes, vec![left(peer, LeftBecause::Announced)], "{result:?}");
    }
    // A report about a replica that still serves, or answers as someone
    // else, changes nothing.
    for result in [ProbeResult::Serving, ProbeResult::Refuted] {
        assert!(
            v.leave_probed(addr(4), 5, result, true, t0).is_empty(),
            "{result:?}"
        );
    }
    assert_eq!(members(&v), vec![(addr(4), Source::Dns)]);
    assert_eq!(
        v.left_members().collect::<Vec<_>>(),
        vec![(addr(2), 5), (addr(3), 5)]
    );
    // A leave announced by the replica itself needs it to say so.
    let mut v = view(8);
    v.dns_answer([addr(2)], t0);
    assert!(
        v.leave_probed(addr(2), 5, ProbeResult::Gone, false, t0)
            .is_empty()
    );
}
