//! The pause-based actuator: the vCPU thread holds itself to its share at its own exits, with
//! the [`Pacer`] its log writer consults (module [`share`](crate::share), which explains why
//! the cgroup quota ([`super::CgroupCpu`]) alone lets bursts through).
//!
//! The throttle sets the share on both actuators ([`Paced`]): the quota still bounds a guest that runs long without exits; the pacer
//! removes the bursts between the scheduler's checks. Where no cgroup can be used the pacer
//! runs alone ([`Paced::inner`] `None`, [`ActuatorKind::Pacer`]).

use super::{Actuator, ActuatorKind, ThrottleError};
use crate::share::Pacer;

/// An actuator that sets the same share on an inner actuator (the cgroup) and on a [`Pacer`].
pub struct Paced {
    /// The scheduler-level actuator (`None`: the pacer alone).
    pub inner: Option<Box<dyn Actuator>>,
    /// The pacer the vCPU thread consults at its exits.
    pub pacer: std::sync::Arc<Pacer>,
}

impl std::fmt::Debug for Paced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paced")
            .field("inner", &self.inner.as_ref().map(|a| a.describe()))
            .field("pacer", &self.pacer)
            .finish()
    }
}

impl Actuator for Paced {
    fn set_share(&mut self, share: f64) -> Result<(), ThrottleError> {
        self.pacer.set_share(share);
        match &mut self.inner {
            Some(a) => a.set_share(share),
            None => Ok(()),
        }
    }
    fn describe(&self) -> String {
        match &self.inner {
            Some(a) => format!("{} + pacing at exits", a.describe()),
            None => "pacing at exits alone (no cgroup)".into(),
        }
    }
    fn kind(&self) -> ActuatorKind {
        match &self.inner {
            Some(a) => a.kind(),
            None => ActuatorKind::Pacer,
        }
    }
}
