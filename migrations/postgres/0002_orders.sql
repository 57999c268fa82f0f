-- The order ledger (src/orders/): every JSAPI order the gateway asks
-- Kongtie for, written before it is sent. Shared by every replica.
CREATE TABLE orders (
    out_trade_id    text        PRIMARY KEY,
    amount_fen      bigint      NOT NULL CHECK (amount_fen > 0),
    openid          text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    -- UNKNOWN, CREATED, FAILED or PAID (EXPIRED is computed when read).
    state           text        NOT NULL,
    -- Kongtie's ResponseText (the pay parameters), and when it came.
    response_text   text,
    params_at       timestamptz,
    -- Kongtie's refusal, when it refused.
    failure_code    text,
    failure_message text,
    -- The notification that paid it.
    paid_sequence   bigint,
    -- Attempts so far; the claim of the one in flight, with its lease.
    attempts        integer     NOT NULL,
    claimed_by      text,
    claimed_until   timestamptz,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX orders_newest_first ON orders (created_at DESC, out_trade_id DESC);

-- Each notification checked against its order at intake: MATCHED,
-- AMOUNT_MISMATCH or UNKNOWN_ORDER (NULL: stored before this migration).
ALTER TABLE notifications ADD COLUMN order_check text;
