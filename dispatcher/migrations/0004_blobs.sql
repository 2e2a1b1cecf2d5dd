-- Spine's job store on PostgreSQL, version 4: the blob store's bytes, for the next leader. A
-- leader copies every blob a job it stores references (large inputs and outputs, map/reduce
-- fragments) here before that commit, so a standby that takes over on another machine finds
-- them. One row per MiB; a blob's row in spine_blobs is written last, in the same
-- transaction: it is there only when every chunk is.
CREATE TABLE spine_blobs (
    sha256    bytea  PRIMARY KEY,
    size      bigint NOT NULL,
    stored_ms bigint NOT NULL
);
CREATE TABLE spine_blob_chunks (
    sha256 bytea   NOT NULL,
    n      integer NOT NULL,
    data   bytea   NOT NULL,
    PRIMARY KEY (sha256, n)
);
