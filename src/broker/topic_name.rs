//! The topic-name rule shared by every RPC: 1..=255 ASCII characters of
//! `[A-Za-z0-9._-]`.

/// The rule, as told to clients when a name breaks it.
pub const TOPIC_NAME_RULE: &str = "topic names are 1 to 255 characters of [A-Za-z0-9._-]";

/// Checks a topic name; the error text names the rule and the offending name.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        Err(format!("invalid topic name {shown:?}: {TOPIC_NAME_RULE}"))
    }
}

/// The same rule for consumer-group names, applied on every RPC (an empty
/// name means `default`).
pub const GROUP_NAME_RULE: &str =
    "consumer group names are 1 to 255 characters of [A-Za-z0-9._-] (empty means \"default\")";

/// Checks a consumer-group name (empty is allowed: it means `default`).
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || validate_topic_name(name).is_ok() {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        Err(format!(
            "invalid consumer group name {shown:?}: {GROUP_NAME_RULE}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_follow_the_topic_rule_or_are_empty() {
        assert!(validate_group_name("").is_ok());
        assert!(validate_group_name("billing.v2_EU-west").is_ok());
        for bad in ["a\0b", "a/b", "line\nbreak", &"g".repeat(70_000)] {
            let err = validate_group_name(bad).unwrap_err();
            assert!(err.contains("consumer group"), "{err}");
            assert!(err.len() < 300, "the name is cut in the message");
        }
    }

    #[test]
    fn accepts_the_allowed_alphabet() {
        assert!(validate_topic_name("orders.v1_EU-west").is_ok());
        assert!(validate_topic_name(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "a b", "a/b", "é", "a*", &"a".repeat(256)] {
            let err = validate_topic_name(bad).unwrap_err();
            assert!(err.contains("[A-Za-z0-9._-]"), "{err}");
        }
    }
}

/// Property-based fuzzing of the topic-name rule (`cargo test --lib fuzz`):
/// arbitrary strings are accepted exactly when they are 1 to 255 characters
/// of `[A-Za-z0-9._-]`, and every refusal names the rule without panicking on
/// long or multi-byte input.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz_support::config;

    proptest! {
        #![proptest_config(config(1024, 1))]

        #[test]
        fn fuzz_topic_names_follow_the_rule(
            name in prop_oneof![
                "[A-Za-z0-9._-]{0,260}",
                "[A-Za-z0-9._-]{250,260}",
                "[A-Za-z0-9._-]{0,8}[^A-Za-z0-9._-][A-Za-z0-9._-]{0,8}",
                any::<String>(),
            ],
        ) {
            let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            let n = name.chars().count();
            let valid = (1..=255).contains(&n) && name.chars().all(allowed);
            match validate_topic_name(&name) {
                Ok(()) => prop_assert!(valid),
                Err(e) => {
                    prop_assert!(!valid);
                    prop_assert!(e.contains(TOPIC_NAME_RULE));
                    // The name is shown cut to 64 (escaped) characters.
                    prop_assert!(e.len() <= 1024);
                }
            }
        }
    }
}
