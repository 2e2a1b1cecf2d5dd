-- Spine's job store on PostgreSQL, version 3: how to reach the leader. A standby names the
-- leader in its answers (HTTP 503 `standby`, XMPP errors) so that clients go there: the
-- leader's HTTP API base URL and its XMPP full JID, written when it takes the lease row.
ALTER TABLE spine_lease ADD COLUMN url text NOT NULL DEFAULT '';
ALTER TABLE spine_lease ADD COLUMN jid text NOT NULL DEFAULT '';
