-- Consumers of two kinds (src/consumers/): cursors, held by one stream at a
-- time (stream_holder until stream_until, renewed while the stream lives),
-- and work queues, with their settings and their pending events.
ALTER TABLE consumers
    ADD COLUMN kind               text        NOT NULL DEFAULT 'cursor'
                                  CHECK (kind IN ('cursor', 'work_queue')),
    ADD COLUMN last_ack_at        timestamptz,
    ADD COLUMN created_at         timestamptz,
    ADD COLUMN deliver_policy     text,
    ADD COLUMN policy_sequence    bigint,
    ADD COLUMN ack_wait_ms        bigint,
    ADD COLUMN max_deliver        integer,
    ADD COLUMN max_ack_pending    integer,
    -- The highest sequence a work queue delivered.
    ADD COLUMN delivered_sequence bigint      NOT NULL DEFAULT 0,
    ADD COLUMN last_fetch_at      timestamptz,
    ADD COLUMN stream_holder      text,
    ADD COLUMN stream_until       timestamptz;
UPDATE consumers SET last_ack_at = updated_at;

-- One row per event a work queue delivered and nobody acknowledged yet: leased
-- until leased_until, then deliverable again while deliveries_left > 0, and
-- parked when none is left. An acknowledgement deletes the row, so the ack
-- floor is just below the oldest row.
CREATE TABLE consumer_pending (
    consumer        text        NOT NULL REFERENCES consumers (name) ON DELETE CASCADE,
    sequence        bigint      NOT NULL,
    delivery_count  integer     NOT NULL,
    deliveries_left integer     NOT NULL CHECK (deliveries_left >= 0),
    leased_until    timestamptz NOT NULL,
    -- Set by the first fetch that found it parked (for the metric).
    parked_at       timestamptz,
    PRIMARY KEY (consumer, sequence)
);
CREATE INDEX consumer_pending_due ON consumer_pending (consumer, leased_until);
