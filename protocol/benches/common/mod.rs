//! What the benchmarks of reading a stream read.

/// The stanzas of one no-op job, as they cross the server (PROTOCOL.md's shapes).
pub const JOB: &str = concat!(
    "<iq type='set' id='s1' to='dispatcher@localhost/main' from='webapp@localhost/app' xmlns='jabber:client'>",
    "<submit xmlns='urn:spine:job:1' capability='text.upper' watch='true'><args/><input mime='text/plain'>aGVsbG8=</input></submit></iq>",
    "<iq type='result' id='s1' to='webapp@localhost/app' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<accepted xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' state='dispatched'/></iq>",
    "<iq type='set' id='j-8f3a-1' to='agent1@localhost/worker' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<job xmlns='urn:spine:job:1' id='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' capability='text.upper' attempt='1' deadline-ms='300000'>",
    "<args/><input mime='text/plain'>aGVsbG8=</input></job></iq>",
    "<iq type='result' id='j-8f3a-1' to='dispatcher@localhost/main' from='agent1@localhost/worker' xmlns='jabber:client'>",
    "<result xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' attempt='1' elapsed-ms='0'><output mime='text/plain'>SEVMTE8=</output></result></iq>",
    "<presence to='dispatcher@localhost/main' from='agent1@localhost/worker' xmlns='jabber:client'>",
    "<load xmlns='urn:spine:load:1' seq='42' slots='64' in-flight='3' loadavg='0.52' mem-free-mb='20123'/></presence>",
    "<message type='normal' to='webapp@localhost/app' from='dispatcher@localhost/main' xmlns='jabber:client'>",
    "<job-status xmlns='urn:spine:job:1' job='0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44' state='succeeded' attempts='1'>",
    "<output mime='text/plain'>SEVMTE8=</output></job-status></message>",
);

/// How many stanzas [`JOB`] holds.
#[allow(
    dead_code,
    reason = "each benchmark includes this module; not every one counts stanzas"
)]
pub const JOB_STANZAS: usize = 6;
