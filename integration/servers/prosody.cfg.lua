-- Prosody configuration used by Spine's tests and benchmarks (Prosody 0.12, Debian).
-- The harness (integration/src/prosody.rs) fills in @DIR@ (a temporary directory owned by
-- the prosody user) and @PORT@ (a free loopback port). What differs from Debian's defaults,
-- and why:

pidfile = "@DIR@/prosody.pid"
data_path = "@DIR@/data"
log = { info = "@DIR@/prosody.log"; error = "@DIR@/prosody.err" }
admins = { }

-- "smacks" (XEP-0198 stream management with resumption) is on, as in Debian's configuration:
-- Spine's clients do not use it (a resumable session would delay `unavailable` for
-- smacks_hibernation_time, 600 s); it stays on to prove that a server offering it changes
-- nothing.
modules_enabled = {
  "disco"; "roster"; "saslauth"; "tls"; "ping"; "presence"; "limits"; "smacks";
}
modules_disabled = { "s2s"; }

-- Prosody enables Nagle's algorithm by default: with delayed ACKs every request/response
-- pair then waits ~40 ms (22 round trips/s instead of hundreds). An agent bus needs it off.
network_settings = { nagle = false }

-- Loopback only, on the port the harness chose.
interfaces = { "127.0.0.1" }
c2s_ports = { @PORT@ }
c2s_direct_tls_ports = { }
s2s_ports = { }

authentication = "internal_hashed"

-- STARTTLS with the certificate the harness generates (self-signed, for localhost): clients
-- that trust it use TLS. Plain TCP stays allowed because the test server listens on
-- loopback only (the embedded server allows the same on loopback); production configurations
-- require TLS (docs/servers.md).
c2s_require_encryption = false
allow_unencrypted_plain_auth = true

-- Debian ships limits = { c2s = { rate = "10kb/s" } }: about 26 round trips per second.
-- Raised so the transport, not a shaper, is what gets measured.
limits = {
  c2s = { rate = "100mb/s"; burst = "2s" };
}

-- Same stanza limit as the embedded server's default (and Prosody's own default).
c2s_stanza_size_limit = 256*1024

VirtualHost "localhost"
  ssl = { certificate = "@DIR@/certs/localhost.crt"; key = "@DIR@/certs/localhost.key"; }
