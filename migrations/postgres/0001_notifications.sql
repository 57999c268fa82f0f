-- Payment notifications shared by every gateway replica.
--
-- Sequences come from the single row of notification_sequence, which each
-- writing transaction locks (SELECT ... FOR UPDATE) before it takes a number
-- and keeps locked until it commits or rolls back. So numbers are handed out
-- in commit order and without gaps: a reader that resumes from
-- "sequence > last seen" never skips a row that commits late (a bigserial,
-- taken at insert, allows exactly that), and a rolled-back writer gives its
-- numbers back.
CREATE TABLE notification_sequence (
    id   boolean PRIMARY KEY DEFAULT true CHECK (id),
    last bigint  NOT NULL CHECK (last >= 0)
);
INSERT INTO notification_sequence (id, last) VALUES (true, 0);

CREATE TABLE notifications (
    sequence         bigint      PRIMARY KEY CHECK (sequence > 0),
    -- SHA-256 of the business fields (TimeStamp and Sign left out): a resend,
    -- to whichever replica, is the same event.
    dedup_digest     bytea       NOT NULL UNIQUE,
    out_trade_id     text        NOT NULL,
    trade_order_id   text        NOT NULL,
    trade_bill_no    text        NOT NULL,
    trade_status     text        NOT NULL,
    message          text        NOT NULL,
    -- TradeAmount exactly as sent, and in fen when it parses; never a float.
    trade_amount     text        NOT NULL,
    amount_fen       bigint,
    trade_time       text        NOT NULL,
    time_stamp       text        NOT NULL,
    raw_body         text        NOT NULL,
    received_at      timestamptz NOT NULL,
    last_received_at timestamptz NOT NULL,
    receive_count    integer     NOT NULL CHECK (receive_count > 0)
);
CREATE INDEX notifications_by_order ON notifications (out_trade_id, sequence);

-- Cumulative, durable positions of named subscribers, shared by replicas.
CREATE TABLE consumers (
    name           text        PRIMARY KEY,
    acked_sequence bigint      NOT NULL,
    updated_at     timestamptz NOT NULL
);
