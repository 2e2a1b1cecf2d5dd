//! Known capabilities: every capability an agent has offered, in this run or an earlier one
//! (from the store). A submission naming any other is refused at once with the closest known
//! names rather than left waiting for an agent that never came.
//!
//! Part of the [`Registry`]; the dispatcher's core checks submissions here and stores what
//! [`Registry::take_learned`] hands it.

use spine_protocol::{CapabilityName, Condition, MapReduce, SpineError};

use super::Registry;

impl Registry {
    /// Capabilities offered in earlier runs (from the store): known, not learnt again.
    pub fn remember(&mut self, caps: impl IntoIterator<Item = CapabilityName>) {
        self.known.extend(caps);
    }

    /// Every known capability.
    pub fn known_capabilities(&self) -> Vec<CapabilityName> {
        self.known.iter().cloned().collect()
    }

    /// Whether an agent has offered `cap` since the start, or did in an earlier run.
    pub fn is_known(&self, cap: &CapabilityName) -> bool {
        self.known.contains(cap)
    }

    /// Capabilities first offered since the last call, for the driver to store.
    pub fn take_learned(&mut self) -> Vec<CapabilityName> {
        std::mem::take(&mut self.learned)
    }

    /// The known capabilities that `visible` lets a submitter see, closest to `name` first
    /// (Damerau-Levenshtein distance, then name): what a typo most likely meant.
    pub fn closest_known(
        &self,
        name: &str,
        visible: impl Fn(&CapabilityName) -> bool,
    ) -> Vec<CapabilityName> {
        let mut v: Vec<(usize, &CapabilityName)> = self
            .known
            .iter()
            .filter(|c| visible(c))
            .map(|c| (strsim::damerau_levenshtein(name, c.as_str()), c))
            .collect();
        v.sort();
        v.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// Refuses a submission that names a capability no agent has offered since the start nor
    /// in an earlier run (`steps`: each capability with the field that names it): an
    /// `unknown-capability` error naming the field and listing the known capabilities that
    /// `visible` lets the submitter see, closest first. `wait_hint` says how to queue it
    /// anyway (the `wait_for_agent` field as the submitter's front end spells it).
    pub fn check_known(
        &self,
        steps: &[(&'static str, &CapabilityName)],
        visible: impl Fn(&CapabilityName) -> bool,
        wait_hint: &str,
    ) -> Result<(), SpineError> {
        let Some((field, cap)) = steps.iter().find(|(_, c)| !self.is_known(c)) else {
            return Ok(());
        };
        let close = self.closest_known(cap.as_str(), visible);
        let known = if close.is_empty() {
            "no capability has been offered that this submitter may run".to_owned()
        } else {
            let shown: Vec<&str> = close.iter().take(KNOWN_SHOWN).map(|c| c.as_str()).collect();
            let more = close.len().saturating_sub(KNOWN_SHOWN);
            format!(
                "known capabilities, closest first: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        };
        Err(SpineError::new(Condition::UnknownCapability)
            .with_field(*field)
            .with_text(format!(
                "no agent has offered {cap} to this dispatcher; {known} (to queue the job until an agent offers it, submit with {wait_hint})"
            )))
    }
}

/// Known capabilities named in an `unknown-capability` answer, at most.
const KNOWN_SHOWN: usize = 10;

/// The capabilities a submission names, with the field (attribute) that names each: the
/// job's, and a map/reduce's reduce and split steps.
pub fn submission_steps<'a>(
    capability: &'a CapabilityName,
    mapreduce: Option<&'a MapReduce>,
) -> Vec<(&'static str, &'a CapabilityName)> {
    let mut v = vec![("capability", capability)];
    if let Some(m) = mapreduce {
        v.push(("reduce", &m.reduce));
        v.extend(m.split.as_ref().map(|s| ("split", s)));
    }
    v
}
