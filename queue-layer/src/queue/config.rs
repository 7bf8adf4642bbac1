//! How a queue is configured: kind, capacity, overflow policy, aging, codec.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The management policy of a queue: the order in which items leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// First in, first out.
    #[default]
    Fifo,
    /// Highest numeric priority first; first in, first out among equal priorities.
    Priority,
}

impl Kind {
    /// Every kind, in the order they are documented.
    pub const ALL: [Kind; 2] = [Kind::Fifo, Kind::Priority];

    /// The name used in topology files, profiles and policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Fifo => "fifo",
            Kind::Priority => "priority",
        }
    }

    /// Parses a kind name as written in a file.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a send does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// The producer waits until there is room (backpressure). The default.
    #[default]
    Block,
    /// The send fails at once with [`SendError::Full`](crate::SendError::Full), giving the item back.
    Fail,
    /// Room is made by evicting items: the oldest of a FIFO queue, the one that would be
    /// served last of a priority queue. Every eviction is counted in the queue's stats.
    DropOldest,
}

impl Overflow {
    /// Every policy, in the order they are documented.
    pub const ALL: [Overflow; 3] = [Overflow::Block, Overflow::Fail, Overflow::DropOldest];

    /// The name used in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Block => "block",
            Overflow::Fail => "fail",
            Overflow::DropOldest => "drop-oldest",
        }
    }

    /// Parses a policy name as written in a file.
    pub fn parse(name: &str) -> Option<Overflow> {
        Overflow::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default capacity in items.
pub const DEFAULT_CAPACITY: usize = 64;
/// Default capacity in bytes (64 MiB).
pub const DEFAULT_CAPACITY_BYTES: u64 = 64 << 20;
/// Default codec name.
pub const DEFAULT_CODEC: &str = "raw";

/// The configuration of one queue, read by serde from topology edges, job profiles and
/// node policy. Every field has a default, so `{}` is a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct Config {
    /// The management policy.
    pub kind: Kind,
    /// The most items the queue holds.
    pub capacity: usize,
    /// The most bytes the queue holds (the sum of its items' sizes).
    pub capacity_bytes: u64,
    /// What a send does when the queue is full.
    pub overflow: Overflow,
    /// Priority queues only: an item gains one priority level for every `aging` items
    /// enqueued after it, so low priorities cannot starve. `None` turns aging off.
    pub aging: Option<u64>,
    /// The largest single item accepted, in bytes; `None` means `capacity_bytes`.
    pub max_item_bytes: Option<u64>,
    /// The codec items are encoded with (a name from the codec registry, e.g. `zstd+cbor`).
    pub codec: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            kind: Kind::Fifo,
            capacity: DEFAULT_CAPACITY,
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            overflow: Overflow::Block,
            aging: None,
            max_item_bytes: None,
            codec: DEFAULT_CODEC.to_owned(),
        }
    }
}

/// A configuration that cannot describe a working queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// capacity must be at least 1 item
    #[error("capacity must be at least 1 item")]
    ZeroCapacity,
    /// capacity-bytes must be at least 1 byte
    #[error("capacity-bytes must be at least 1 byte")]
    ZeroCapacityBytes,
    /// max-item-bytes is larger than the queue's capacity in bytes
    #[error("max-item-bytes ({max_item}) is larger than capacity-bytes ({capacity})")]
    ItemLargerThanQueue {
        /// The configured largest item.
        max_item: u64,
        /// The configured byte capacity.
        capacity: u64,
    },
    /// aging must be at least 1
    #[error("aging must be at least 1 (items per priority level)")]
    ZeroAging,
    /// aging applies to priority queues only
    #[error("aging applies to priority queues only, not to {0} queues")]
    AgingWithoutPriority(Kind),
}

impl Config {
    /// A FIFO configuration with the given item capacity and defaults elsewhere.
    pub fn fifo(capacity: usize) -> Config {
        Config {
            capacity,
            ..Config::default()
        }
    }

    /// A priority configuration with the given item capacity and defaults elsewhere.
    pub fn priority(capacity: usize) -> Config {
        Config {
            kind: Kind::Priority,
            capacity,
            ..Config::default()
        }
    }

    /// Checks that the configuration describes a working queue.
    ///
    /// # Errors
    /// The first inconsistency found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.capacity == 0 {
            return Err(ConfigError::ZeroCapacity);
        }
        if self.capacity_bytes == 0 {
            return Err(ConfigError::ZeroCapacityBytes);
        }
        if let Some(max_item) = self.max_item_bytes
            && max_item > self.capacity_bytes
        {
            return Err(ConfigError::ItemLargerThanQueue {
                max_item,
                capacity: self.capacity_bytes,
            });
        }
        match (self.kind, self.aging) {
            (_, Some(0)) => Err(ConfigError::ZeroAging),
            (Kind::Fifo, Some(_)) => Err(ConfigError::AgingWithoutPriority(Kind::Fifo)),
            _ => Ok(()),
        }
    }

    /// The largest item this queue accepts, in bytes.
    pub fn item_limit(&self) -> u64 {
        self.max_item_bytes
            .unwrap_or(self.capacity_bytes)
            .min(self.capacity_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_is_the_default() {
        let c: Config = toml_like("{}");
        assert_eq!(c, Config::default());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn reads_kebab_case_names() {
        let c: Config = toml_like(
            r#"{"kind":"priority","capacity":8,"overflow":"drop-oldest","aging":4,"codec":"zstd+cbor"}"#,
        );
        assert_eq!(c.kind, Kind::Priority);
        assert_eq!(c.overflow, Overflow::DropOldest);
        assert_eq!(c.aging, Some(4));
        assert_eq!(c.codec, "zstd+cbor");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_fields_and_names_are_refused() {
        assert!(serde_json::from_str::<Config>(r#"{"capacty":3}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"kind":"lifo"}"#).is_err());
        assert!(serde_json::from_str::<Config>(r#"{"overflow":"drop"}"#).is_err());
    }

    #[test]
    fn validation_catches_inconsistencies() {
        assert_eq!(Config::fifo(0).validate(), Err(ConfigError::ZeroCapacity));
        let c = Config {
            capacity_bytes: 0,
            ..Config::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::ZeroCapacityBytes));
        let c = Config {
            capacity_bytes: 10,
            max_item_bytes: Some(11),
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ItemLargerThanQueue { .. })
        ));
        let c = Config {
            aging: Some(2),
            ..Config::fifo(4)
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::AgingWithoutPriority(Kind::Fifo))
        );
        let c = Config {
            aging: Some(0),
            ..Config::priority(4)
        };
        assert_eq!(c.validate(), Err(ConfigError::ZeroAging));
    }

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        for o in Overflow::ALL {
            assert_eq!(Overflow::parse(o.as_str()), Some(o));
        }
        assert_eq!(Kind::parse("stack"), None);
    }

    fn toml_like(s: &str) -> Config {
        serde_json::from_str(s).expect("valid config")
    }
}
