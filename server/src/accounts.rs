//! Accounts and credential checks: salted SCRAM keys per user (never passwords), and the
//! optional development mode in which any user logs in with one shared secret.

use std::collections::HashMap;

use rand::RngCore as _;

use crate::config::ServerConfig;
use crate::scram::{Hash, ScramKeys, DEFAULT_ITERATIONS};

#[derive(Default)]
struct Keys {
    sha1: Option<ScramKeys>,
    sha256: Option<ScramKeys>,
}

impl Keys {
    fn get(&self, hash: Hash) -> Option<&ScramKeys> {
        match hash {
            Hash::Sha1 => self.sha1.as_ref(),
            Hash::Sha256 => self.sha256.as_ref(),
        }
    }
}

/// The credential store of a running server.
pub struct Accounts {
    users: HashMap<String, Keys>,
    /// Keys derived from the development secret (same for every user).
    dev: Option<Keys>,
    /// Salt for made-up keys of unknown users, so failures look the same for every name.
    decoy_salt: [u8; 16],
}

fn random_salt() -> [u8; 16] {
    let mut s = [0u8; 16];
    rand::rng().fill_bytes(&mut s);
    s
}

fn derive_both(password: &str) -> Keys {
    Keys {
        sha1: Some(ScramKeys::derive(
            Hash::Sha1,
            password,
            &random_salt(),
            DEFAULT_ITERATIONS,
        )),
        sha256: Some(ScramKeys::derive(
            Hash::Sha256,
            password,
            &random_salt(),
            DEFAULT_ITERATIONS,
        )),
    }
}

impl Accounts {
    /// Builds the store from a validated configuration (derives keys for plain passwords).
    pub fn from_config(cfg: &ServerConfig) -> Self {
        let mut users = HashMap::new();
        for a in &cfg.accounts {
            let keys = match &a.password {
                Some(pw) => derive_both(pw),
                None => {
                    let read = |h: &Option<String>| {
                        h.as_deref()
                            .and_then(|s| ScramKeys::from_rfc5803(s).ok())
                            .map(|(_, k)| k)
                    };
                    Keys {
                        sha1: read(&a.scram_sha1),
                        sha256: read(&a.scram_sha256),
                    }
                }
            };
            users.insert(a.user.clone(), keys);
        }
        Accounts {
            users,
            dev: cfg.dev_secret.as_deref().map(derive_both),
            decoy_salt: random_salt(),
        }
    }

    /// Whether any login is possible at all.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.dev.is_none()
    }

    /// The SCRAM keys of `user` for `hash`, or `None` (unknown user, or no key for that hash).
    pub fn scram_keys(&self, user: &str, hash: Hash) -> Option<ScramKeys> {
        match self.users.get(user) {
            Some(k) => k.get(hash).cloned(),
            None => self.dev.as_ref().and_then(|d| d.get(hash).cloned()),
        }
    }

    /// Keys that no password matches, for an exchange with an unknown user.
    pub fn decoy_keys(&self, user: &str, hash: Hash) -> ScramKeys {
        // Salt depends on the name so repeated attempts see a stable salt, like a real user.
        let mut salt = self.decoy_salt.to_vec();
        salt.extend_from_slice(user.as_bytes());
        let mut k = ScramKeys::derive(hash, "", &salt[..16.min(salt.len())], DEFAULT_ITERATIONS);
        k.stored_key.iter_mut().for_each(|b| *b = !*b);
        k
    }

    /// SASL PLAIN check.
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        let keys = match self.users.get(user) {
            Some(k) => k,
            None => match &self.dev {
                Some(d) => d,
                None => return false,
            },
        };
        if let Some(k) = &keys.sha256 {
            return k.verify_password(Hash::Sha256, password);
        }
        keys.sha1
            .as_ref()
            .is_some_and(|k| k.verify_password(Hash::Sha1, password))
    }
}

/// The `[[account]]` block for a new user, with RFC 5803 hashes instead of the password.
pub fn account_block(user: &str, password: &str) -> String {
    let k = derive_both(password);
    let (Some(s256), Some(s1)) = (k.sha256, k.sha1) else {
        unreachable!("derive_both sets both")
    };
    format!(
        "[[account]]\nuser = \"{user}\"\nscram_sha256 = \"{}\"\nscram_sha1 = \"{}\"\n",
        s256.to_rfc5803(Hash::Sha256),
        s1.to_rfc5803(Hash::Sha1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_hashes() {
        let block = account_block("bob", "s3cret");
        let cfg = ServerConfig::from_toml(&format!(
            "[[account]]\nuser = \"alice\"\npassword = \"pw\"\n{block}"
        ))
        .unwrap();
        let acc = Accounts::from_config(&cfg);
        assert!(acc.check_password("alice", "pw"));
        assert!(!acc.check_password("alice", "PW"));
        assert!(acc.check_password("bob", "s3cret"));
        assert!(!acc.check_password("carol", "pw"));
        assert!(acc.scram_keys("bob", Hash::Sha1).is_some());
        assert!(acc.scram_keys("carol", Hash::Sha256).is_none());
        assert!(!acc.is_empty());
    }

    #[test]
    fn dev_mode_accepts_any_user_with_the_secret() {
        let cfg = ServerConfig::from_toml("dev_secret = \"dev\"").unwrap();
        let acc = Accounts::from_config(&cfg);
        assert!(acc.check_password("anyone", "dev"));
        assert!(!acc.check_password("anyone", "nope"));
        assert!(acc.scram_keys("whoever", Hash::Sha256).is_some());
    }
}
