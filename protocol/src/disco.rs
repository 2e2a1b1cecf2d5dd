//! XEP-0030 service discovery on agents: an agent lists each capability as a feature
//! `urn:spine:1:capability:<name>`, so generic XMPP tools can see what it offers.

use xmpp_parsers::disco::{DiscoInfoResult, Identity};

use crate::names::CapabilityName;
use crate::NS;

/// Prefix of the disco feature that names a capability.
pub const CAPABILITY_FEATURE_PREFIX: &str = "urn:spine:1:capability:";
/// XEP-0030 identity category of a Spine agent.
pub const IDENTITY_CATEGORY: &str = "automation";
/// XEP-0030 identity type of a Spine agent.
pub const IDENTITY_TYPE: &str = "spine-agent";

/// The disco feature for one capability.
pub fn capability_feature(name: &CapabilityName) -> String {
    format!("{CAPABILITY_FEATURE_PREFIX}{name}")
}

/// The disco#info answer of an agent offering `caps`.
pub fn agent_disco_info<'a>(caps: impl IntoIterator<Item = &'a CapabilityName>) -> DiscoInfoResult {
    let mut features: std::collections::BTreeSet<String> = [
        xmpp_parsers::ns::DISCO_INFO.to_owned(),
        xmpp_parsers::ns::PING.to_owned(),
        NS.to_owned(),
    ]
    .into_iter()
    .collect();
    features.extend(caps.into_iter().map(capability_feature));
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new(
            IDENTITY_CATEGORY,
            IDENTITY_TYPE,
            "en",
            "spine agent",
        )],
        features,
        extensions: Vec::new(),
    }
}

/// The capabilities a disco#info answer lists (features with the capability prefix whose
/// rest is a valid capability name).
pub fn capabilities_in(info: &DiscoInfoResult) -> Vec<CapabilityName> {
    info.features
        .iter()
        .filter_map(|f| f.strip_prefix(CAPABILITY_FEATURE_PREFIX))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use minidom::Element;

    #[test]
    fn lists_capabilities_as_features() {
        let caps: Vec<CapabilityName> = vec![
            "image.thumbnail".parse().unwrap(),
            "wordcount.map".parse().unwrap(),
        ];
        let info = agent_disco_info(&caps);
        assert!(info
            .features
            .contains("urn:spine:1:capability:image.thumbnail"));
        assert!(info.features.contains("urn:xmpp:ping"));
        assert!(info.features.contains("urn:spine:1"));
        let el: Element = info.into();
        let back = DiscoInfoResult::try_from(el).unwrap();
        assert_eq!(capabilities_in(&back), caps);
        assert_eq!(back.identities[0].type_, "spine-agent");
    }
}
