//! The broker core: a sans-IO state machine. It owns topics, consumer groups,
//! subscriptions, credit windows, cursors, redelivery and heartbeat timers.
//! Events go in as method calls (with the time handed in), decisions come out
//! as [`Action`]s and pulled [`Delivery`]s. It calls nothing that does IO.

mod core;
pub mod credit;
pub mod ledger;
pub mod message;
pub mod message_id;
pub mod tail;
pub mod topic_name;

pub use self::core::{
    Action, Broker, BrokerConfig, DeadLetter, Delivery, DeliveryPolicy, EndReason, Fetch,
    GroupDeliveries, GroupView, Start, SubId, SubscribeError, SubscribeRequest, SubscriptionStatus,
    TopicView, DEAD_LETTER_REASON_MAX_DELIVERIES,
};
pub use message::StoredMessage;
pub use message_id::MessageId;
pub use topic_name::{validate_group_name, validate_topic_name, GROUP_NAME_RULE, TOPIC_NAME_RULE};
