//! What the two sides of a pair must agree on besides their initial state.
//!
//! The pairing digest (guest image, command line, memory, device set, disk contents) proves
//! both sides start from the same state. These settings decide how the pair behaves when a
//! side fails, and a pair that disagrees on them fails badly: a backup with an arbiter and a
//! primary without one (the backup presumes the primary failed, since it never hears its
//! heartbeats, and takes over while the primary still serves), heartbeats sent where nobody
//! listens, one side writing the shared disk while the other writes its own copy. So each side
//! sends its [`PairingSettings`] in the channel handshake (the HELLO's opaque settings blob,
//! JSON, `channel/PROTOCOL.md`), each compares the other's field by field, and any difference
//! refuses the pairing on **both** sides with one message naming every field that differs and
//! both values; both exit with [`crate::exit::PAIRING_REFUSED`].
//!
//! | field | must |
//! |---|---|
//! | `arbiter` | be present on both sides or on neither, with the same address |
//! | `node` | differ (two sides with one node id would be one node to the arbiter) |
//! | `shared_disk` | be equal (the disk mode) |
//! | `heartbeat`, `peer_heartbeat` | cross: each side's heartbeat address is the other's peer address |
//! | `fail_timeout_ms` | be equal |
//! | `generation` | be equal |

use std::net::SocketAddr;
use std::sync::Arc;

use ftvm_channel::reliable::SettingsCheck;
use ftvm_ft::Role;
use serde::{Deserialize, Serialize};

use crate::config::CommonConfig;

/// One side's settings, as sent in the handshake (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingSettings {
    /// `primary` or `backup` (the sender's role, for messages).
    pub role: String,
    /// The arbiter spec (`None`: no failover).
    pub arbiter: Option<String>,
    /// This side's node id on the arbiter.
    pub node: Option<String>,
    /// Shared-disk mode.
    pub shared_disk: bool,
    /// This side's heartbeat address.
    pub heartbeat: Option<SocketAddr>,
    /// Where this side sends its heartbeats.
    pub peer_heartbeat: Option<SocketAddr>,
    /// The failure timeout in milliseconds.
    pub fail_timeout_ms: Option<u64>,
    /// The generation the pair starts in.
    pub generation: u64,
    /// Digest of the CPUID this host shows the guest (`KvmContext::cpuid_digest`, hex;
    /// `None` where KVM could not be opened to compute it): a guest that reads CPUID on a
    /// primary and a backup of different CPU models would diverge, so the pair is refused.
    #[serde(default)]
    pub cpuid: Option<String>,
}

fn show<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "none".to_string(), ToString::to_string)
}

impl PairingSettings {
    /// `role`'s settings, derived from its configuration.
    pub fn new(role: Role, config: &CommonConfig) -> Self {
        let ft = config.failover(role);
        let ft = ft.as_ref();
        PairingSettings {
            role: crate::config::role_name(role).into(),
            arbiter: ft.map(|f| f.arbiter.to_string()),
            node: ft.map(|f| f.node.clone()),
            shared_disk: config.shared_disk,
            heartbeat: ft.map(|f| f.heartbeat),
            peer_heartbeat: ft.map(|f| f.peer_heartbeat),
            fail_timeout_ms: ft.map(|f| f.fail_timeout.as_millis() as u64),
            generation: ft.map_or(1, |f| f.generation),
            cpuid: None,
        }
    }

    /// These settings with this host's CPUID digest (see [`PairingSettings::cpuid`]).
    pub fn with_cpuid(mut self, digest: Option<u64>) -> Self {
        self.cpuid = digest.map(|d| format!("{d:016x}"));
        self
    }

    /// Every field on which `self` (this side) and `theirs` (the peer) disagree, each naming
    /// both values; empty when they agree.
    pub fn differences(&self, theirs: &Self) -> Vec<String> {
        let (me, them) = (&self.role, &theirs.role);
        let mut d = Vec::new();
        let mut field = |name: &str, mine: String, other: String| {
            if mine != other {
                d.push(format!("{name}: this {me} has {mine}, the {them} {other}"));
            }
        };
        field("arbiter", show(&self.arbiter), show(&theirs.arbiter));
        field(
            "shared_disk",
            self.shared_disk.to_string(),
            theirs.shared_disk.to_string(),
        );
        field(
            "fail_timeout_ms",
            show(&self.fail_timeout_ms),
            show(&theirs.fail_timeout_ms),
        );
        field(
            "generation",
            self.generation.to_string(),
            theirs.generation.to_string(),
        );
        if let (Some(mine), Some(other)) = (&self.cpuid, &theirs.cpuid) {
            if mine != other {
                d.push(format!(
                    "cpuid: this {me} shows the guest CPU model {mine}, the {them} {other} \
                     (different host CPUs: a guest that reads CPUID would diverge)"
                ));
            }
        }
        if self.arbiter.is_some() && self.node.is_some() && self.node == theirs.node {
            d.push(format!(
                "node: both sides are node {} on the arbiter (they must differ)",
                show(&self.node)
            ));
        }
        if self.heartbeat != theirs.peer_heartbeat || self.peer_heartbeat != theirs.heartbeat {
            d.push(format!(
                "heartbeat addresses: this {me} beats from {} to {}, the {them} from {} to {} \
                 (each side's --heartbeat must be the other's --peer-heartbeat)",
                show(&self.heartbeat),
                show(&self.peer_heartbeat),
                show(&theirs.heartbeat),
                show(&theirs.peer_heartbeat)
            ));
        }
        d
    }

    /// The blob sent in the handshake.
    ///
    /// # Errors
    /// When the settings cannot be serialised.
    pub fn to_blob(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// Checks the peer's blob: `Err` names every difference.
    ///
    /// # Errors
    /// The text of the refusal.
    pub fn check(&self, blob: &[u8]) -> Result<(), String> {
        let theirs: Self = serde_json::from_slice(blob).map_err(|e| {
            format!(
                "the peer's settings are not understood ({e}): {:?}",
                String::from_utf8_lossy(blob)
            )
        })?;
        let d = self.differences(&theirs);
        if d.is_empty() {
            Ok(())
        } else {
            Err(format!("settings differ: {}", d.join("; ")))
        }
    }

    /// The channel's check of the peer's blob ([`ftvm_channel::Config::check_settings`]).
    pub fn channel_check(self) -> SettingsCheck {
        let me = Arc::new(self);
        SettingsCheck(Arc::new(move |blob| me.check(blob)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(role: &str, me: u16, peer: u16) -> PairingSettings {
        PairingSettings {
            role: role.into(),
            arbiter: Some("file:/a".into()),
            node: Some(role.into()),
            shared_disk: false,
            heartbeat: Some(SocketAddr::from(([127, 0, 0, 1], me))),
            peer_heartbeat: Some(SocketAddr::from(([127, 0, 0, 1], peer))),
            fail_timeout_ms: Some(200),
            generation: 1,
            cpuid: Some("00000000000000aa".into()),
        }
    }

    #[test]
    fn matching_sides_agree_and_each_difference_is_named_with_both_values() {
        let p = side("primary", 7102, 7101);
        let b = side("backup", 7101, 7102);
        assert!(p.differences(&b).is_empty());
        assert!(p.check(&b.to_blob().expect("blob")).is_ok());
        let mut x = b.clone();
        x.arbiter = None;
        x.fail_timeout_ms = Some(600);
        x.heartbeat = Some(SocketAddr::from(([127, 0, 0, 1], 9)));
        let err = p.check(&x.to_blob().expect("blob")).expect_err("differs");
        assert!(
            err.contains("arbiter: this primary has file:/a, the backup none"),
            "{err}"
        );
        assert!(
            err.contains("fail_timeout_ms: this primary has 200, the backup 600"),
            "{err}"
        );
        assert!(err.contains("heartbeat addresses"), "{err}");
        let mut y = b;
        y.node = Some("primary".into());
        assert!(p.differences(&y)[0].starts_with("node: both sides are node primary"));
        assert!(p.check(b"{not json").is_err());
    }

    #[test]
    fn different_cpu_models_are_refused_and_an_unknown_one_is_not_compared() {
        let p = side("primary", 7102, 7101).with_cpuid(Some(0xaa));
        let b = side("backup", 7101, 7102).with_cpuid(Some(0xbb));
        let err = p.check(&b.to_blob().expect("blob")).expect_err("differs");
        assert!(err.contains("cpuid: this primary shows the guest CPU model 00000000000000aa, the backup 00000000000000bb"), "{err}");
        let unknown = side("backup", 7101, 7102).with_cpuid(None);
        assert!(p.differences(&unknown).is_empty());
        // An older peer's blob without the field parses (as unknown).
        let mut v = serde_json::to_value(side("backup", 7101, 7102)).expect("json");
        v.as_object_mut().expect("object").remove("cpuid");
        let old = serde_json::to_vec(&v).expect("blob");
        assert!(p.check(&old).is_ok());
    }
}
