//! Deterministic tests of the broker core: no IO, time handed in.

use super::*;

fn msg(topic: &str, seq: u64) -> Arc<StoredMessage> {
    Arc::new(StoredMessage {
        sequence: seq,
        ordinal: seq,
        id: MessageId::new(1_000 + seq as i64, seq, topic),
        timestamp_ms: 1_000 + seq as i64,
        payload: format!("m{seq}").into_bytes().into(),
        attributes: Default::default(),
    })
}

fn group(topic: &str, g: &str, start: Start) -> SubscribeRequest {
    SubscribeRequest {
        topic: topic.into(),
        group: Some(g.into()),
        start,
        policy: Default::default(),
    }
}

fn actions(b: &mut Broker) -> Vec<Action> {
    std::iter::from_fn(|| b.pop_action()).collect()
}

fn drain(b: &mut Broker, sub: SubId, now: u64) -> Vec<(u64, u32)> {
    std::iter::from_fn(|| b.next_delivery(sub, now))
        .map(|d| (d.message.sequence, d.delivery_count))
        .collect()
}

fn publish(b: &mut Broker, topic: &str, seqs: std::ops::RangeInclusive<u64>) {
    let msgs: Vec<_> = seqs.map(|s| msg(topic, s)).collect();
    b.on_committed(topic, 1, &msgs);
}

#[test]
fn zero_credit_means_zero_deliveries_and_credit_is_exact() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=10);
    assert!(b.next_delivery(1, 0).is_none());
    b.grant(1, 0);
    assert!(b.next_delivery(1, 0).is_none());
    b.grant(1, 5);
    assert!(actions(&mut b).contains(&Action::Wake(1)));
    assert_eq!(drain(&mut b, 1, 0).len(), 5);
    assert!(b.next_delivery(1, 0).is_none());
    b.grant(1, 100);
    assert_eq!(
        drain(&mut b, 1, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
    assert_eq!(b.credit(1), Some(95));
}

#[test]
fn start_positions() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=3);
    publish(&mut b, "other", 4..=4);
    publish(&mut b, "t", 5..=6);
    for (sub, start, want) in [
        (1, Start::Earliest, vec![1, 2, 3, 5, 6]),
        (2, Start::Latest, vec![]),
        (3, Start::Offset(4), vec![5, 6]),
        (4, Start::Offset(3), vec![3, 5, 6]),
    ] {
        b.subscribe(
            sub,
            SubscribeRequest {
                topic: "t".into(),
                group: None,
                start,
                policy: Default::default(),
            },
            0,
            0,
        )
        .unwrap();
        b.grant(sub, 100);
        let got: Vec<u64> = drain(&mut b, sub, 0).iter().map(|d| d.0).collect();
        assert_eq!(got, want, "{start:?}");
    }
    publish(&mut b, "t", 7..=7);
    assert_eq!(
        drain(&mut b, 2, 0),
        vec![(7, 1)],
        "LATEST sees only later messages"
    );
}

#[test]
fn acks_are_cumulative_persisted_and_never_go_backwards() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=5);
    b.grant(1, 10);
    drain(&mut b, 1, 0);
    actions(&mut b);
    let id = |s| msg("t", s).id.to_string();
    b.ack(1, &id(3), 77);
    let persisted: Vec<_> = actions(&mut b);
    assert!(matches!(
        &persisted[..],
        [Action::PersistCursor {
            sequence: 3,
            acked_at_ms: 77,
            ..
        }]
    ));
    b.ack(1, &id(2), 78); // backwards: ignored
    b.ack(1, &id(3), 78); // duplicate: ignored
    b.ack(1, "garbage", 78);
    b.ack(1, &msg("other-topic", 4).id.to_string(), 78);
    assert!(actions(&mut b).is_empty());
    b.ack_many(1, [id(4).as_str(), id(5).as_str(), id(1).as_str()], 79);
    assert!(matches!(
        &actions(&mut b)[..],
        [Action::PersistCursor { sequence: 5, .. }]
    ));
    assert_eq!(b.groups("t")[0].cursor, 5);
}

#[test]
fn ack_of_a_message_never_sent_is_ignored() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=5);
    b.grant(1, 2);
    drain(&mut b, 1, 0);
    actions(&mut b);
    b.ack(1, &msg("t", 5).id.to_string(), 1);
    assert!(actions(&mut b).is_empty());
    assert_eq!(b.groups("t")[0].cursor, 0);
}

#[test]
fn reconnect_resumes_after_the_cursor_and_counts_redeliveries() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=4);
    b.grant(1, 10);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1), (2, 1), (3, 1), (4, 1)]);
    b.ack(1, &msg("t", 2).id.to_string(), 1);
    b.unsubscribe(1);
    // A new group member ignores its requested start: the cursor wins.
    b.subscribe(2, group("t", "g", Start::Latest), 0, 0)
        .unwrap();
    b.grant(2, 10);
    assert_eq!(drain(&mut b, 2, 0), vec![(3, 2), (4, 2)]);
}

#[test]
fn takeover_ends_the_first_consumer_and_the_newcomer_starts_without_credit() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=3);
    b.grant(1, 1);
    drain(&mut b, 1, 0);
    actions(&mut b);
    b.subscribe(2, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    assert!(actions(&mut b).contains(&Action::End {
        sub: 1,
        reason: EndReason::TakenOver
    }));
    assert!(b.next_delivery(1, 0).is_none());
    assert_eq!(b.credit(1), None);
    assert!(b.next_delivery(2, 0).is_none(), "newcomer has zero credit");
    b.grant(2, 10);
    assert_eq!(drain(&mut b, 2, 0), vec![(1, 2), (2, 1), (3, 1)]);
    // Unsubscribing the old stream later must not detach the newcomer.
    b.unsubscribe(1);
    publish(&mut b, "t", 4..=4);
    assert_eq!(drain(&mut b, 2, 0), vec![(4, 1)]);
}

#[test]
fn browse_neither_creates_nor_moves_a_cursor() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=2);
    b.subscribe(
        1,
        SubscribeRequest {
            topic: "t".into(),
            group: None,
            start: Start::Earliest,
            policy: Default::default(),
        },
        0,
        0,
    )
    .unwrap();
    b.grant(1, 5);
    drain(&mut b, 1, 0);
    b.ack(1, &msg("t", 2).id.to_string(), 1);
    assert!(actions(&mut b)
        .iter()
        .all(|a| !matches!(a, Action::PersistCursor { .. })));
    assert!(b.groups("t").is_empty());
}

#[test]
fn nack_redelivers_only_that_message_after_its_delay_spending_credit() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=3);
    b.grant(1, 3);
    assert_eq!(drain(&mut b, 1, 0).len(), 3);
    b.nack(1, &msg("t", 2).id.to_string(), 500, 1_000);
    assert_eq!(b.next_deadline(), Some(1_500));
    b.tick(1_499);
    b.grant(1, 5);
    assert!(b.next_delivery(1, 1_499).is_none(), "not before the delay");
    b.tick(1_500);
    assert!(actions(&mut b).contains(&Action::Wake(1)));
    assert_eq!(drain(&mut b, 1, 1_500), vec![(2, 2)]);
    assert_eq!(b.credit(1), Some(4));
    b.nack(1, &msg("t", 2).id.to_string(), 0, 2_000);
    b.tick(2_000);
    assert_eq!(drain(&mut b, 1, 2_000), vec![(2, 3)]);
}

#[test]
fn nack_waits_for_credit_and_reads_evicted_messages_from_storage() {
    let mut b = Broker::new(BrokerConfig {
        tail_max_messages: 2,
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=1);
    b.grant(1, 1);
    drain(&mut b, 1, 0);
    b.nack(1, &msg("t", 1).id.to_string(), 0, 0);
    publish(&mut b, "t", 2..=4); // evicts 1 from memory
    actions(&mut b);
    b.tick(0);
    let fetch = actions(&mut b)
        .into_iter()
        .find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .expect("a read of the evicted message");
    assert_eq!((fetch.from, fetch.limit), (1, 1));
    b.on_page(1, fetch.id, vec![msg("t", 1)], None);
    assert!(b.next_delivery(1, 0).is_none(), "no credit");
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 2)]);
}

#[test]
fn acking_past_a_nacked_message_cancels_its_redelivery() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=2);
    b.grant(1, 10);
    drain(&mut b, 1, 0);
    b.nack(1, &msg("t", 1).id.to_string(), 10, 0);
    b.ack(1, &msg("t", 2).id.to_string(), 0);
    b.tick(100);
    assert!(drain(&mut b, 1, 100).is_empty());
}

#[test]
fn backlog_is_read_in_pages_no_larger_than_credit() {
    let mut b = Broker::new(BrokerConfig::default());
    b.load_topic(
        TopicView {
            name: "t".into(),
            created_at_ms: 0,
            first_seq: 1,
            first_ordinal: 1,
            first_ts: 0,
            last_seq: 1000,
            last_ordinal: 1000,
            last_ts: 0,
        },
        1000,
    );
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    actions(&mut b);
    assert!(b.next_delivery(1, 0).is_none());
    assert!(actions(&mut b).is_empty(), "no credit, no read");
    b.grant(1, 3);
    let fetches: Vec<_> = actions(&mut b)
        .into_iter()
        .filter_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(fetches.len(), 1);
    assert_eq!((fetches[0].from, fetches[0].limit), (1, 3));
    b.grant(1, 2);
    assert!(
        actions(&mut b)
            .iter()
            .all(|a| !matches!(a, Action::Fetch(_))),
        "one read at a time"
    );
    b.on_page(
        1,
        fetches[0].id,
        (1..=3).map(|s| msg("t", s)).collect(),
        None,
    );
    assert_eq!(
        drain(&mut b, 1, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // The next page starts after the last one, limited by the credit left.
    let next = actions(&mut b)
        .into_iter()
        .find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .expect("next page");
    assert_eq!((next.from, next.limit), (4, 2));
}

#[test]
fn a_short_page_hands_over_to_the_live_tail() {
    let mut b = Broker::new(BrokerConfig::default());
    b.load_topic(
        TopicView {
            name: "t".into(),
            created_at_ms: 0,
            first_seq: 1,
            first_ordinal: 1,
            first_ts: 0,
            last_seq: 2,
            last_ordinal: 2,
            last_ts: 0,
        },
        5,
    );
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.grant(1, 10);
    let f = actions(&mut b)
        .into_iter()
        .find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .unwrap();
    b.on_page(1, f.id, vec![msg("t", 1), msg("t", 2)], Some(5));
    publish(&mut b, "t", 6..=6);
    assert_eq!(
        drain(&mut b, 1, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![1, 2, 6]
    );
}

#[test]
fn heartbeats_only_on_idle_streams() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 1_000,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    actions(&mut b);
    b.grant(1, 10);
    publish(&mut b, "t", 1..=1);
    b.tick(900);
    drain(&mut b, 1, 900);
    b.tick(1_000);
    assert!(actions(&mut b)
        .iter()
        .all(|a| !matches!(a, Action::Heartbeat { .. })));
    b.tick(1_900);
    assert!(actions(&mut b).contains(&Action::Heartbeat {
        sub: 1,
        latest_seq: 1
    }));
    assert_eq!(b.next_deadline(), Some(2_900));
}

#[test]
fn subscribing_creates_the_topic_and_rejects_bad_names() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("new", "", Start::Latest), 0, 42)
        .unwrap();
    let a = actions(&mut b);
    assert!(a.contains(&Action::CreateTopic {
        topic: "new".into(),
        created_at_ms: 42
    }));
    assert_eq!(b.groups("new")[0].name.as_ref(), "default");
    assert!(b
        .subscribe(2, group("bad name", "g", Start::Latest), 0, 0)
        .is_err());
}

#[test]
fn fan_out_to_many_groups() {
    let mut b = Broker::new(BrokerConfig::default());
    for g in 0..100 {
        b.subscribe(g, group("t", &format!("g{g}"), Start::Earliest), 0, 0)
            .unwrap();
        b.grant(g, 10);
    }
    publish(&mut b, "t", 1..=3);
    for g in 0..100 {
        assert_eq!(drain(&mut b, g, 0).len(), 3);
    }
}

#[test]
fn delete_and_reset_affect_live_streams() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.subscribe(2, group("t", "h", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=5);
    b.grant(1, 10);
    drain(&mut b, 1, 0);
    assert!(b.reset_cursor("t", "g", 2));
    assert_eq!(
        drain(&mut b, 1, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert!(!b.reset_cursor("t", "nope", 2));
    actions(&mut b);
    assert!(b.delete_group("t", "h"));
    assert!(actions(&mut b).contains(&Action::End {
        sub: 2,
        reason: EndReason::GroupDeleted
    }));
    assert!(b.delete_topic("t"));
    assert!(actions(&mut b).contains(&Action::End {
        sub: 1,
        reason: EndReason::TopicDeleted
    }));
    assert!(!b.delete_topic("t"));
    assert_eq!(b.subscription_count(), 0);
}

#[test]
fn retention_trims_memory_and_moves_positions_forward() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=10);
    b.grant(1, 2);
    assert_eq!(drain(&mut b, 1, 0).len(), 2);
    // Retention deleted 1..=7: the consumer continues at 8, BROWSE from 1 too.
    b.on_trimmed("t", Some((8, 8, 1_008)));
    b.grant(1, 100);
    assert_eq!(
        drain(&mut b, 1, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    b.subscribe(
        2,
        SubscribeRequest {
            topic: "t".into(),
            group: None,
            start: Start::Earliest,
            policy: Default::default(),
        },
        0,
        0,
    )
    .unwrap();
    b.grant(2, 100);
    assert_eq!(
        drain(&mut b, 2, 0).iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert_eq!(b.topic("t").unwrap().total_messages(), 3);
    // Everything expired.
    b.on_trimmed("t", None);
    assert_eq!(b.topic("t").unwrap().total_messages(), 0);
    b.subscribe(
        3,
        SubscribeRequest {
            topic: "t".into(),
            group: None,
            start: Start::Earliest,
            policy: Default::default(),
        },
        0,
        0,
    )
    .unwrap();
    b.grant(3, 100);
    assert!(drain(&mut b, 3, 0).is_empty());
    publish(&mut b, "t", 11..=11);
    assert_eq!(drain(&mut b, 3, 0), vec![(11, 1)]);
}

#[test]
fn redelivery_timers_go_with_their_nacks() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=3);
    b.grant(1, 3);
    drain(&mut b, 1, 0);
    b.nack(1, &msg("t", 1).id.to_string(), 60_000, 0);
    b.nack(1, &msg("t", 3).id.to_string(), u32::MAX, 0);
    assert_eq!(b.next_deadline(), Some(60_000));
    b.ack(1, &msg("t", 2).id.to_string(), 0);
    assert_eq!(
        b.next_deadline(),
        Some(24 * 3600 * 1000),
        "acked nack gone; long delay capped"
    );
    b.unsubscribe(1);
    assert_eq!(b.next_deadline(), None, "a closed stream leaves no timers");
}

#[test]
fn reset_to_the_largest_sequence_does_not_wrap() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=3);
    b.grant(1, 10);
    assert!(b.reset_cursor("t", "g", u64::MAX));
    assert!(drain(&mut b, 1, 0).is_empty());
    b.unsubscribe(1);
    b.subscribe(2, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.grant(2, 10);
    assert!(drain(&mut b, 2, 0).is_empty());
}

#[test]
fn a_trim_wakes_a_consumer_waiting_on_a_stale_read() {
    let mut b = Broker::new(BrokerConfig::default());
    b.load_topic(
        TopicView {
            name: "t".into(),
            created_at_ms: 0,
            first_seq: 1,
            first_ordinal: 1,
            first_ts: 0,
            last_seq: 100,
            last_ordinal: 100,
            last_ts: 0,
        },
        100,
    );
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.grant(1, 5);
    actions(&mut b);
    // Retention removes 1..=49 while the read from 1 is in flight.
    b.on_trimmed("t", Some((50, 50, 0)));
    let fetch = actions(&mut b)
        .into_iter()
        .find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .expect("a new read from the oldest message left");
    assert_eq!(fetch.from, 50);
}

#[test]
fn a_panic_inside_the_core_aborts_the_process() {
    if std::env::var_os("SLUICE_CORE_PANIC_CHILD").is_some() {
        let _core = super::AbortOnUnwind;
        panic!("injected panic inside the core");
    }
    // Run this test again in a child process, which must die by SIGABRT
    // rather than unwind to a caller that would keep serving.
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "broker::core::tests::a_panic_inside_the_core_aborts_the_process",
            "--nocapture",
        ])
        .env("SLUICE_CORE_PANIC_CHILD", "1")
        .output()
        .expect("child");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(6), "{out:?}");
}

#[test]
fn admin_operations_hold_back_acks_until_they_commit_or_fail() {
    let mut b = Broker::new(BrokerConfig::default());
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=3);
    b.grant(1, 10);
    drain(&mut b, 1, 0);
    actions(&mut b);
    let id = |s| msg("t", s).id.to_string();
    let persists = |acts: Vec<Action>| -> Vec<u64> {
        acts.into_iter()
            .filter_map(|a| match a {
                Action::PersistCursor { sequence, .. } => Some(sequence),
                _ => None,
            })
            .collect()
    };
    // A ResetCursor is in flight: the ack moves memory but is not persisted.
    assert!(b.fence_group("t", "g"));
    b.ack(1, &id(1), 5);
    assert!(persists(actions(&mut b)).is_empty());
    // The reset failed: the cursor as it is now is persisted again.
    b.unfence_group("t", "g", 6);
    assert_eq!(persists(actions(&mut b)), vec![1]);
    // A delete in flight: acks meanwhile are not persisted, a reset is
    // refused (its write would land after the delete and bring the group
    // back on disk), and the group goes only when the delete commits.
    assert!(b.begin_group_delete("t", "g"));
    b.ack(1, &id(2), 7);
    assert!(persists(actions(&mut b)).is_empty());
    assert!(
        !b.fence_group("t", "g"),
        "no reset while the delete is pending"
    );
    assert_eq!(b.groups("t").len(), 1, "still there until the commit");
    // A failed delete: the group is whole again, resets work, the cursor is
    // persisted again.
    b.group_delete_failed("t", "g", 8);
    assert_eq!(persists(actions(&mut b)), vec![2]);
    assert!(b.fence_group("t", "g"));
    b.unfence_group("t", "g", 9);
    actions(&mut b);
    assert!(b.begin_group_delete("t", "g"));
    assert!(b.delete_group("t", "g"));
    assert!(b.groups("t").is_empty());
    assert!(!b.fence_group("t", "missing"));
    assert!(!b.begin_group_delete("t", "missing"));
}

#[test]
fn heartbeat_timers_go_with_their_subscriptions() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 1_000,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.subscribe(2, group("t", "g", Start::Earliest), 10, 0)
        .unwrap(); // takes 1 over
    b.subscribe(3, group("t", "h", Start::Earliest), 20, 0)
        .unwrap();
    assert_eq!(b.next_deadline(), Some(1_010), "none left of 1");
    b.tick(1_015); // 2 sends a heartbeat and re-arms for 2_015
    b.unsubscribe(2);
    assert_eq!(b.next_deadline(), Some(1_020), "3's; none left of 2");
    b.delete_group("t", "h");
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn a_consumer_behind_an_emptied_topic_does_not_read_it_again_and_again() {
    let mut b = Broker::new(BrokerConfig {
        tail_max_messages: 1,
        ..Default::default()
    });
    publish(&mut b, "t", 1..=3); // 1 and 2 are on disk only
    b.on_trimmed("t", None); // then retention deleted everything
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.grant(1, 10);
    // The store is empty, so a short page's `end` is 0: below position 1.
    for _ in 0..3 {
        let Some(f) = actions(&mut b).into_iter().find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        }) else {
            break;
        };
        b.on_page(1, f.id, vec![], Some(0));
    }
    assert!(
        actions(&mut b)
            .iter()
            .all(|a| !matches!(a, Action::Fetch(_))),
        "no read of a range retention emptied, over and over"
    );
    publish(&mut b, "t", 4..=4);
    assert_eq!(drain(&mut b, 1, 0), vec![(4, 1)]);
}

#[test]
fn a_redelivery_read_outlived_by_its_nack_does_not_answer_the_next_nack() {
    let mut b = Broker::new(BrokerConfig {
        tail_max_messages: 1,
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(
        1,
        SubscribeRequest {
            topic: "t".into(),
            group: None,
            start: Start::Earliest,
            policy: Default::default(),
        },
        0,
        0,
    )
    .unwrap();
    publish(&mut b, "t", 1..=1);
    b.grant(1, 10);
    drain(&mut b, 1, 0);
    publish(&mut b, "t", 2..=3); // evicts 1 from memory
    b.nack(1, &msg("t", 1).id.to_string(), 0, 0);
    actions(&mut b);
    b.tick(0);
    let stale = actions(&mut b)
        .into_iter()
        .find_map(|a| match a {
            Action::Fetch(f) => Some(f),
            _ => None,
        })
        .expect("a read of the nacked message");
    // Retention deletes it while that read is in flight; the client nacks
    // it again, with a long delay.
    b.on_trimmed("t", Some((2, 2, 0)));
    b.nack(1, &msg("t", 1).id.to_string(), 60_000, 0);
    b.on_page(1, stale.id, vec![msg("t", 1)], None);
    assert!(drain(&mut b, 1, 0).iter().all(|d| d.0 != 1), "trimmed");
    b.unsubscribe(1);
    assert_eq!(b.next_deadline(), None, "no timer left behind");
}

#[test]
fn a_failed_redelivery_read_is_asked_again() {
    let mut b = Broker::new(BrokerConfig {
        tail_max_messages: 1,
        heartbeat_interval_ms: 0,
        ..Default::default()
    });
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    publish(&mut b, "t", 1..=1);
    b.grant(1, 1);
    drain(&mut b, 1, 0);
    publish(&mut b, "t", 2..=2); // evicts 1 from memory
    b.nack(1, &msg("t", 1).id.to_string(), 0, 0);
    actions(&mut b);
    b.tick(0);
    let fetch = |b: &mut Broker| {
        actions(b)
            .into_iter()
            .find_map(|a| match a {
                Action::Fetch(f) => Some(f),
                _ => None,
            })
            .expect("a read of the nacked message")
    };
    let failed = fetch(&mut b);
    b.on_page(1, failed.id, vec![], None); // what the reader sends on error
    let again = fetch(&mut b);
    assert_eq!((again.from, again.limit), (1, 1));
    b.on_page(1, again.id, vec![msg("t", 1)], None);
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 2)]);
}

#[test]
fn ten_thousand_subscribe_cancel_cycles_leave_no_timers_behind() {
    let mut b = Broker::new(BrokerConfig {
        heartbeat_interval_ms: 1_000,
        ..Default::default()
    });
    publish(&mut b, "t", 1..=3);
    b.subscribe(0, group("t", "keeper", Start::Earliest), 0, 0)
        .unwrap();
    let mut now = 0;
    for sub in 1..=10_000u64 {
        now += 7;
        b.subscribe(sub, group("t", "g", Start::Earliest), now, 0)
            .unwrap();
        b.grant(sub, 2);
        let sent = drain(&mut b, sub, now);
        if let Some(&(seq, _)) = sent.first() {
            b.nack(sub, &msg("t", seq).id.to_string(), 60_000, now);
        }
        match sub % 4 {
            0 => b.unsubscribe(sub),
            1 => {} // taken over by the next one
            2 => {
                b.delete_group("t", "g");
            }
            _ => {
                b.reset_cursor("t", "g", 0);
                b.unsubscribe(sub);
            }
        }
        b.tick(now);
        actions(&mut b);
    }
    b.unsubscribe(10_000);
    // Only the one open stream's heartbeat remains.
    let mine = b
        .timers
        .iter()
        .filter(|(_, t)| matches!(t, Timer::Heartbeat { sub: 0 }))
        .count();
    assert_eq!(
        b.timers.len(),
        1,
        "{:?}",
        b.timers.iter().take(5).collect::<Vec<_>>()
    );
    assert_eq!(mine, 1);
    b.unsubscribe(0);
    assert!(b.timers.is_empty());
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn a_group_going_idle_is_announced_and_another_gateways_cursor_is_adopted() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=10);
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.grant(1, 3);
    assert_eq!(drain(&mut b, 1, 0).len(), 3);
    b.ack(1, &msg("t", 2).id.to_string(), 5);
    actions(&mut b);
    // While the consumer is active here, a cursor stored elsewhere is stale.
    b.adopt_cursor("t", "g", 8, 9, 0);
    assert_eq!(b.groups("t")[0].cursor, 2);
    assert!(b.group_active("t", "g"));
    // The stream ends: the group goes idle (no takeover happened here).
    b.unsubscribe(1);
    let idle = Action::GroupIdle {
        topic: "t".into(),
        group: "g".into(),
    };
    assert!(actions(&mut b).contains(&idle));
    assert!(!b.group_active("t", "g"));
    // Another gateway served it since: its cursor counts, delivery counts restart.
    b.adopt_cursor("t", "g", 6, 9, 0);
    b.subscribe(2, group("t", "g", Start::Latest), 0, 0)
        .unwrap();
    b.grant(2, 10);
    assert_eq!(drain(&mut b, 2, 0), [(7, 1), (8, 1), (9, 1), (10, 1)]);
    // A group this gateway never saw, on a topic it never saw, is created.
    b.adopt_cursor("fresh", "h", 4, 9, 77);
    assert_eq!(b.topic("fresh").map(|t| t.created_at_ms), Some(77));
    assert_eq!(b.groups("fresh")[0].cursor, 4);
}

#[test]
fn a_group_claimed_elsewhere_ends_its_consumer_here_as_a_takeover() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=3);
    b.subscribe(1, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    actions(&mut b);
    assert!(b.end_group_consumer("t", "g", EndReason::TakenOver));
    let got = actions(&mut b);
    assert!(got.contains(&Action::End {
        sub: 1,
        reason: EndReason::TakenOver
    }));
    assert!(got.contains(&Action::GroupIdle {
        topic: "t".into(),
        group: "g".into()
    }));
    assert!(
        !b.end_group_consumer("t", "g", EndReason::GroupUnavailable),
        "nothing active any more"
    );
    assert!(b.next_delivery(1, 0).is_none());
    // A local takeover leaves the group active: no GroupIdle.
    b.subscribe(2, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    b.subscribe(3, group("t", "g", Start::Earliest), 0, 0)
        .unwrap();
    assert!(!actions(&mut b)
        .iter()
        .any(|a| matches!(a, Action::GroupIdle { .. })));
}

fn with_policy(topic: &str, g: &str, max: u32, deadline_ms: u32) -> SubscribeRequest {
    SubscribeRequest {
        policy: DeliveryPolicy {
            max_deliveries: max,
            dead_letter_topic: (max > 0).then(|| Arc::from(format!("{topic}.dead-letter"))),
            ack_deadline_ms: deadline_ms,
        },
        ..group(topic, g, Start::Earliest)
    }
}

fn dead_letters(actions: &[Action]) -> Vec<DeadLetter> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::DeadLetter(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_message_past_max_deliveries_is_dead_lettered_once_and_skipped() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=2);
    let mut sub = 1;
    // A consumer that takes one message and crashes, three times.
    for round in 1..=3 {
        b.subscribe(sub, with_policy("t", "g", 3, 0), 0, 0).unwrap();
        b.grant(sub, 1);
        assert_eq!(drain(&mut b, sub, 0), vec![(1, round)]);
        b.unsubscribe(sub);
        sub += 1;
    }
    actions(&mut b);
    b.subscribe(sub, with_policy("t", "g", 3, 0), 0, 0).unwrap();
    b.grant(sub, 1);
    // The fourth delivery of 1 would pass the limit: 2 comes instead,
    // spending the only credit; 1 goes to the dead-letter topic.
    assert_eq!(drain(&mut b, sub, 0), vec![(2, 1)]);
    let dead = dead_letters(&actions(&mut b));
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!((d.message.sequence, d.delivery_count), (1, 3));
    assert_eq!(&*d.dead_letter_topic, "t.dead-letter");
    assert!(d.advance_cursor, "1 is the group's next unacked message");
    assert_eq!(
        d.attributes()["sluice-dead-letter-reason"],
        "max_deliveries"
    );
    // Committed: the cursor moves past it; it is never offered again.
    b.on_dead_lettered("t", "g", 1, true, true, 0);
    assert_eq!(b.group_cursor("t", "g"), Some(1));
    b.unsubscribe(sub);
    b.subscribe(sub + 1, with_policy("t", "g", 3, 0), 0, 0)
        .unwrap();
    b.grant(sub + 1, 10);
    assert_eq!(drain(&mut b, sub + 1, 0), vec![(2, 2)]);
    assert!(dead_letters(&actions(&mut b)).is_empty());
}

#[test]
fn a_failed_dead_letter_append_is_tried_again() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=1);
    b.subscribe(1, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.grant(1, 5);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1)]);
    b.nack(1, &msg("t", 1).id.to_string(), 0, 0);
    b.tick(0);
    assert!(drain(&mut b, 1, 0).is_empty(), "dead-lettered, not sent");
    assert_eq!(dead_letters(&actions(&mut b)).len(), 1);
    b.on_dead_lettered("t", "g", 1, false, false, 10);
    assert_eq!(b.group_cursor("t", "g"), Some(0));
    b.tick(10 + 1_000);
    assert!(drain(&mut b, 1, 1_010).is_empty());
    assert_eq!(dead_letters(&actions(&mut b)).len(), 1, "asked again");
}

#[test]
fn delivery_counts_of_groups_with_max_deliveries_are_persisted_and_restored() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=1);
    b.subscribe(1, with_policy("t", "g", 5, 0), 0, 0).unwrap();
    b.grant(1, 1);
    drain(&mut b, 1, 0);
    let persisted: Vec<_> = actions(&mut b)
        .into_iter()
        .filter(|a| matches!(a, Action::PersistDelivery { .. }))
        .collect();
    assert_eq!(persisted.len(), 1);
    // A new broker (a restart) that loads what was persisted.
    let mut b = Broker::new(BrokerConfig::default());
    b.load_topic(
        TopicView {
            name: "t".into(),
            created_at_ms: 1,
            first_seq: 1,
            first_ordinal: 1,
            first_ts: 1,
            last_seq: 1,
            last_ordinal: 1,
            last_ts: 1,
        },
        1,
    );
    b.load_group(
        "t",
        GroupView {
            name: "g".into(),
            cursor: 0,
            cursor_ordinal: 0,
            last_ack_ms: 0,
        },
    );
    b.load_group_deliveries(
        "t",
        "g",
        GroupDeliveries {
            max_deliveries: 5,
            dead_letter_topic: Some("t.dead-letter".into()),
            delivered_max: 1,
            counts: vec![(1, 4)],
            dead: vec![],
        },
    );
    b.on_page(1, 0, vec![], None);
    b.subscribe(1, with_policy("t", "g", 5, 0), 0, 0).unwrap();
    b.grant(1, 1);
    for a in actions(&mut b) {
        if let Action::Fetch(f) = a {
            b.on_page(1, f.id, vec![msg("t", 1)], Some(1));
        }
    }
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 5)]);
}

#[test]
fn an_ack_deadline_redelivers_once_per_deadline_when_credit_allows() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=2);
    b.subscribe(1, with_policy("t", "g", 0, 100), 0, 0).unwrap();
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1)]);
    assert_eq!(b.next_deadline().filter(|&t| t <= 100), Some(100));
    b.tick(100);
    assert!(drain(&mut b, 1, 100).is_empty(), "no credit: nothing sent");
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 150), vec![(1, 2)]);
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 150), vec![(2, 1)]);
    // An ack of 2 covers 1 as well: no more redeliveries, no timers left
    // but the heartbeat.
    b.ack(1, &msg("t", 2).id.to_string(), 0);
    b.grant(1, 5);
    b.tick(10_000);
    assert!(drain(&mut b, 1, 10_000).is_empty());
    assert!(b
        .timers
        .iter()
        .all(|(_, t)| matches!(t, Timer::Heartbeat { .. })));
}

#[test]
fn with_an_ack_deadline_unacked_deliveries_are_bounded() {
    let mut b = Broker::new(BrokerConfig {
        max_unacked: 3,
        ..BrokerConfig::default()
    });
    publish(&mut b, "t", 1..=10);
    b.subscribe(1, with_policy("t", "g", 0, 60_000), 0, 0)
        .unwrap();
    b.grant(1, 100);
    assert_eq!(drain(&mut b, 1, 0).len(), 3);
    b.ack(1, &msg("t", 2).id.to_string(), 0);
    assert_eq!(drain(&mut b, 1, 0).len(), 2);
}

#[test]
fn deadline_redeliveries_waiting_for_credit_count_towards_the_unacked_bound() {
    let mut b = Broker::new(BrokerConfig {
        max_unacked: 3,
        ..BrokerConfig::default()
    });
    publish(&mut b, "t", 1..=10);
    b.subscribe(1, with_policy("t", "g", 0, 100), 0, 0).unwrap();
    b.grant(1, 3);
    assert_eq!(drain(&mut b, 1, 0).len(), 3);
    // All three deadlines pass: they wait for credit as redeliveries, and
    // still count, so new credit brings them back, not new messages.
    b.tick(100);
    b.grant(1, 3);
    assert_eq!(drain(&mut b, 1, 100), vec![(1, 2), (2, 2), (3, 2)]);
    b.grant(1, 3);
    assert!(drain(&mut b, 1, 100).is_empty(), "still three unacked");
}

/// Message 1 of `t`, delivered once to group `g` (max_deliveries 1), whose
/// consumer left: the next consumer (sub 2) dead-letters it instead.
fn delivered_once_with_max_one() -> Broker {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=1);
    b.subscribe(1, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.grant(1, 1);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1)]);
    b.unsubscribe(1);
    b
}

/// Found by the seeded simulation (`sim.rs`, once it played dead-letter
/// moves): when a dead-letter commit moves the cursor past a message
/// (`advanced`, or `skip_dead`), the group forgets it (`g.dead` drops
/// entries at or below the cursor), but the active stream may still hold
/// it: here it subscribed between the move and its commit, so its position
/// is the message; a nack of it waiting for redelivery does the same.
/// `next_delivery` sent it, since it was neither in `g.dead` nor above the
/// cursor; it now skips what the cursor passed.
#[test]
fn a_message_dead_lettered_while_a_consumer_reconnects_is_not_delivered_again() {
    let mut b = delivered_once_with_max_one();
    // The second delivery would pass max_deliveries 1: dead-lettered.
    b.subscribe(2, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.grant(2, 1);
    assert!(drain(&mut b, 2, 0).is_empty());
    let dead = dead_letters(&actions(&mut b));
    assert_eq!(dead.len(), 1);
    assert!(dead[0].advance_cursor);
    // The consumer reconnects before the move commits: it starts at 1.
    b.unsubscribe(2);
    b.subscribe(3, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.on_dead_lettered("t", "g", 1, true, true, 0);
    assert_eq!(b.group_cursor("t", "g"), Some(1));
    b.grant(3, 1);
    assert_eq!(
        drain(&mut b, 3, 0),
        vec![],
        "1 is in the dead-letter topic and the cursor is past it"
    );
}

/// Found by the seeded simulation: new deliveries paused at `max_unacked`,
/// but a nack freed its message's place while its redelivery was still to
/// come, so a new message took the place and the redelivery then went past
/// the bound. Pending redeliveries now count towards it.
#[test]
fn unacked_deliveries_stay_within_max_unacked() {
    let mut b = Broker::new(BrokerConfig {
        max_unacked: 1,
        ..BrokerConfig::default()
    });
    publish(&mut b, "t", 1..=2);
    b.subscribe(1, with_policy("t", "g", 0, 60_000), 0, 0)
        .unwrap();
    b.grant(1, 10);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1)]);
    // A nacked message still holds its place: 2 waits, 1 comes back.
    b.nack(1, &msg("t", 1).id.to_string(), 10, 0);
    assert_eq!(drain(&mut b, 1, 0), vec![]);
    b.tick(10);
    assert_eq!(drain(&mut b, 1, 10), vec![(1, 2)]);
    assert!(b.subs[&1].unacked.len() <= 1, "{:?}", b.subs[&1].unacked);
}

/// Found by the seeded simulation, the same hole as the test above from
/// another side: a stream still sends what its group's cursor passed
/// (here: a reconnected consumer acks, late, what the previous stream got),
/// and with an ack deadline such a delivery can never be acked (acks at or
/// below the cursor are ignored): its deadline redelivers it again and
/// again, and at `max_unacked` it stalls the stream. Fixed: a group's
/// stream skips what its cursor passed.
#[test]
fn what_the_cursor_passed_is_not_redelivered_forever() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=3);
    b.subscribe(1, with_policy("t", "g", 0, 100), 0, 0).unwrap();
    b.grant(1, 3);
    assert_eq!(drain(&mut b, 1, 0).len(), 3);
    b.unsubscribe(1);
    b.subscribe(2, with_policy("t", "g", 0, 100), 0, 0).unwrap();
    b.grant(2, 1);
    assert_eq!(drain(&mut b, 2, 0), vec![(1, 2)]);
    // The consumer acks 3, which the first stream sent.
    b.ack(2, &msg("t", 3).id.to_string(), 0);
    assert_eq!(b.group_cursor("t", "g"), Some(3));
    b.grant(2, 100);
    let mut sent = drain(&mut b, 2, 0);
    for now in [1_000, 2_000, 3_000] {
        b.ack(2, &msg("t", 3).id.to_string(), 0);
        b.tick(now);
        sent.extend(drain(&mut b, 2, now));
    }
    assert_eq!(sent, vec![], "1..=3 are acked");
}

/// Found by the seeded simulation: a failed dead-letter move is retried on
/// the group's active stream (a redelivery and its timer); when that
/// stream's in-order pass reaches the message first and dead-letters it
/// again, `dead_letter` drops the pending redelivery but not its timer. The
/// timer outlives it (also the stream), and if the message is pending
/// again by then (the move failed again) it fires that retry early.
#[test]
fn dead_lettering_a_message_pending_redelivery_drops_its_timer() {
    let mut b = delivered_once_with_max_one();
    b.subscribe(2, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.grant(2, 1);
    assert!(drain(&mut b, 2, 0).is_empty());
    assert_eq!(dead_letters(&actions(&mut b)).len(), 1);
    // A new stream, then the move fails: its retry waits on the new stream.
    b.unsubscribe(2);
    b.subscribe(3, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.on_dead_lettered("t", "g", 1, false, false, 0);
    // Its in-order pass reaches 1 first and dead-letters it again.
    b.grant(3, 1);
    assert!(drain(&mut b, 3, 0).is_empty());
    assert_eq!(dead_letters(&actions(&mut b)).len(), 1);
    b.unsubscribe(3);
    assert!(
        b.timers.is_empty(),
        "no stream is left, yet timers remain: {:?}",
        b.timers
    );
}

/// Found by the seeded simulation: a failed dead-letter move of a message
/// the stream has nacked meanwhile (its redelivery pending, with a timer)
/// replaces the pending redelivery's due time (`insert`) without arming a
/// timer for it, so the pending entry and its timer disagree: the retry
/// fires at the nack's time, and removing it (an ack) leaves that timer
/// behind.
#[test]
fn a_failed_dead_letter_move_of_a_nacked_message_keeps_one_timer() {
    let mut b = Broker::new(BrokerConfig::default());
    publish(&mut b, "t", 1..=1);
    b.subscribe(1, with_policy("t", "g", 1, 0), 0, 0).unwrap();
    b.grant(1, 5);
    assert_eq!(drain(&mut b, 1, 0), vec![(1, 1)]);
    let id = msg("t", 1).id.to_string();
    b.nack(1, &id, 0, 0);
    b.tick(0);
    assert!(drain(&mut b, 1, 0).is_empty());
    assert_eq!(dead_letters(&actions(&mut b)).len(), 1);
    // The consumer nacks 1 again (its move is not committed yet)...
    b.nack(1, &id, 5_000, 0);
    // ...and the move fails.
    b.on_dead_lettered("t", "g", 1, false, false, 10);
    let pending: Vec<_> = b.subs[&1]
        .redeliver_pending
        .iter()
        .map(|(&seq, &due)| (due, Timer::Redeliver { sub: 1, seq }))
        .collect();
    let timers: Vec<_> = b
        .timers
        .iter()
        .filter(|(_, t)| matches!(t, Timer::Redeliver { .. }))
        .copied()
        .collect();
    assert_eq!(timers, pending);
}

#[test]
fn a_dead_letter_topic_to_create_counts_against_the_topic_limit() {
    let mut b = Broker::new(BrokerConfig {
        max_topics: 2,
        ..BrokerConfig::default()
    });
    publish(&mut b, "t", 1..=1);
    // t exists; t.dead-letter would be the second topic: fine.
    b.subscribe(1, with_policy("t", "g", 3, 0), 0, 0).unwrap();
    publish(&mut b, "u", 2..=2);
    // Two topics exist: u's dead-letter topic would be a third.
    let e = b
        .subscribe(2, with_policy("u", "g", 3, 0), 0, 0)
        .unwrap_err();
    assert!(matches!(e, SubscribeError::LimitReached(_)), "{e:?}");
    // Without max_deliveries there is nothing to create.
    b.subscribe(3, with_policy("u", "g", 0, 0), 0, 0).unwrap();
}
