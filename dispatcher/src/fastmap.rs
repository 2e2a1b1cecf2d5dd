//! Hash maps for the dispatcher's hot tables, with a faster hasher than the standard one.
//!
//! The standard `HashMap` hashes with SipHash-1-3, built to resist collision attacks on keys
//! an attacker chooses. The maps here are keyed by the dispatcher's own ids (jobs, IQ ids),
//! by agents' JIDs and by capability and submitter names of authenticated callers, looked up
//! several times per job: SipHash was about 2.5 % of the dispatcher's CPU under load
//! (BENCHMARKS.md, "Cost per job over HTTP"). `foldhash` (the hasher `hashbrown` uses by
//! default) is several times faster on short keys and still seeded at random per process, so
//! its collisions cannot be worked out in advance. Maps keyed by what a caller chooses freely
//! (idempotency keys) keep the standard hasher.

/// A `HashMap` hashed with `foldhash`; make one with `HashMap::default()`.
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` hashed with `foldhash`; make one with `HashSet::default()`.
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
