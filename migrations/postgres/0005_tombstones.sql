-- Tombstones (src/retention/): the keys of what retention deleted, kept for
-- ever, so that a resend of a swept payment is still a repeat and a swept
-- order's id is not ordered again. Keys only: the SHA-256 of the dedup key
-- and the event's sequence; the order's id and whether it was paid.
CREATE TABLE swept_notifications (
    dedup_digest bytea  PRIMARY KEY,
    sequence     bigint NOT NULL
);
CREATE TABLE swept_orders (
    out_trade_id text    PRIMARY KEY,
    paid         boolean NOT NULL
);
