//! The one submission interface: "run this command at the shard's owner".
//!
//! Two implementations: the local executor pool (this node serves the shard) and a
//! peer of the forwarder (another node does). The router picks one per attempt, the
//! internal port's handler calls the local one, and every layer reports a command that
//! did not reach a committed outcome with the same [`Undelivered`], so whether it may
//! exist in the database is decided once, where it is known, and carried unchanged.

use serde::{Deserialize, Serialize};

use crate::domain::{CommandOutcome, OperationCommand};

/// Why a command has no committed outcome (yet), and whether it may have one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase", tag = "kind", content = "reason")]
pub enum Undelivered {
    /// The node asked does not serve the shard. Nothing was done; ask the owner.
    #[error("this node does not serve the shard")]
    NotOwner,
    /// Certainly not applied, now or later.
    #[error("not applied: {0}")]
    NotApplied(NotApplied),
    /// May have been committed: the command must be looked up before anyone says
    /// it was not applied.
    #[error("may exist: {0}")]
    MayExist(MayExist),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
pub enum NotApplied {
    /// A queue on the way was full; the command was refused at once.
    #[error("a queue was full")]
    Overloaded,
    /// Its deadline passed before it was planned. For a command that may exist this
    /// is said only after the owner looked it up and did not find it.
    #[error("the deadline passed before it was planned")]
    Expired,
    /// Its batch could not be committed, and certainly was not. For a command that
    /// may exist this is said only after the owner looked it up.
    #[error("its batch failed and was rolled back")]
    CommitFailed,
    /// The owner could not be reached: the command was never sent.
    #[error("the owner could not be reached")]
    Unreachable,
}

impl NotApplied {
    /// Whether the answer also covers earlier attempts that may exist: the owner looked
    /// the command up after its deadline, when no copy of it can be planned any more.
    pub fn settles_earlier_attempts(self) -> bool {
        matches!(self, Self::Expired)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
pub enum MayExist {
    /// COMMIT was sent and no answer came back, and the outcome could not be looked
    /// up before the shard was handed over.
    #[error("the commit's outcome is not known yet")]
    CommitUnresolved,
    /// The request to the owner was sent and no answer came back in time.
    #[error("the owner did not answer in time")]
    OwnerSilent,
    /// The owner's answer was cut off or could not be read.
    #[error("the owner's answer was lost")]
    AnswerLost,
}

/// Runs commands at the owner of their shard.
#[async_trait::async_trait]
pub trait Submit: Send + Sync {
    /// Runs `command` (of `shard`) and waits for its committed outcome. Returns within
    /// bounded time: the command's deadline, plus one commit and its look-up.
    async fn submit(
        &self,
        shard: u32,
        command: OperationCommand,
    ) -> Result<CommandOutcome, Undelivered>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_names_the_kind_and_the_reason() {
        let cases = [
            (Undelivered::NotOwner, r#"{"kind":"notOwner"}"#),
            (
                Undelivered::NotApplied(NotApplied::Overloaded),
                r#"{"kind":"notApplied","reason":"overloaded"}"#,
            ),
            (
                Undelivered::MayExist(MayExist::CommitUnresolved),
                r#"{"kind":"mayExist","reason":"commitUnresolved"}"#,
            ),
        ];
        for (value, json) in cases {
            assert_eq!(serde_json::to_string(&value).expect("json"), json);
            assert_eq!(
                serde_json::from_str::<Undelivered>(json).expect("parse"),
                value
            );
        }
    }
}
