-- trading-ledger: PostgreSQL history (PostgreSQL 15).
--
-- Idempotent: every statement is CREATE ... IF NOT EXISTS, so loading this file twice is a
-- no-op. `ledger serve` applies it at start (ledger.schema.apply_schema).
--
-- Money and quantity columns are NUMERIC without precision or scale (unconstrained). The seed
-- design's DECIMAL(20, 8) would truncate sub-1e-8 prices; an unconstrained NUMERIC holds up to
-- 131072 digits before the point and 16383 after, so it comfortably holds 38 digits with 18 after
-- the point, and it stores the ledger's 28-significant-digit averages (entry/exit prices, inverse
-- PnL) exactly, digit for digit, with no rounding on the way in.
--
-- Timestamps are TIMESTAMPTZ (UTC on the wire as epoch milliseconds).

-- ----------------------------------------------------------------------------- positions
-- One row per position (open, closed or liquidated). The projector writes closed and
-- liquidated positions exactly once.
CREATE TABLE IF NOT EXISTS positions (
    id              UUID            PRIMARY KEY,
    user_id         VARCHAR(64)     NOT NULL,
    exchange        VARCHAR(32)     NOT NULL,
    symbol          VARCHAR(48)     NOT NULL,
    side            VARCHAR(16)     NOT NULL CHECK (side IN ('long', 'short')),
    size            NUMERIC,        -- total quantity opened over the position's life
    entry_price     NUMERIC,        -- quantity-weighted average of the opening fills
    exit_price      NUMERIC,        -- average of the reducing fills
    leverage        INT             NOT NULL DEFAULT 1,
    realized_pnl    NUMERIC,        -- net: gross PnL of reducing fills minus fees
    gross_pnl       NUMERIC,
    unrealized_pnl  NUMERIC,
    fees            NUMERIC,        -- in the settlement currency
    status          VARCHAR(16)     NOT NULL CHECK (status IN ('open', 'closed', 'liquidated')),
    close_reason    VARCHAR(64),
    version         INT             NOT NULL,   -- aggregate version of the last applied event
    metadata        JSONB           NOT NULL DEFAULT '{}',
    created_at      TIMESTAMPTZ     NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ     NOT NULL DEFAULT now(),
    closed_at       TIMESTAMPTZ
);

CREATE INDEX IF NOT EXISTS positions_user_exchange_idx ON positions (user_id, exchange);
CREATE INDEX IF NOT EXISTS positions_status_idx ON positions (status);

-- ----------------------------------------------------------------------------- orders
CREATE TABLE IF NOT EXISTS orders (
    id                  UUID            PRIMARY KEY,
    user_id             VARCHAR(64)     NOT NULL,
    exchange            VARCHAR(32)     NOT NULL,
    symbol              VARCHAR(48)     NOT NULL,
    side                VARCHAR(16)     NOT NULL CHECK (side IN ('buy', 'sell')),
    order_type          VARCHAR(32)     NOT NULL CHECK (order_type IN (
                            'market', 'limit', 'stop_market', 'stop_limit', 'take_profit_market')),
    quantity            NUMERIC         NOT NULL,
    price               NUMERIC,
    trigger_price       NUMERIC,
    filled_qty          NUMERIC         NOT NULL DEFAULT 0,
    avg_fill_price      NUMERIC,
    status              VARCHAR(16)     NOT NULL CHECK (status IN (
                            'pending', 'open', 'partially_filled', 'pending_cancel',
                            'filled', 'cancelled', 'rejected', 'expired')),
    exchange_order_id   VARCHAR(128),
    client_order_id     VARCHAR(64),
    position_id         UUID,
    position_side       VARCHAR(8)      CHECK (position_side IS NULL
                                               OR position_side IN ('long', 'short')),
    reduce_only         BOOLEAN         NOT NULL DEFAULT false,
    grid_level          INT,
    reject_reason       TEXT,
    version             INT             NOT NULL,
    metadata            JSONB           NOT NULL DEFAULT '{}',
    created_at          TIMESTAMPTZ     NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ     NOT NULL DEFAULT now(),
    -- The seed makes exchange_order_id globally UNIQUE. Venue order ids are only unique per
    -- venue (OKX and Binance may both issue "123456"), so uniqueness is per (exchange, id).
    -- NULLs (orders not yet acknowledged by the venue) never conflict.
    CONSTRAINT orders_exchange_order_id_key UNIQUE (exchange, exchange_order_id)
);

CREATE INDEX IF NOT EXISTS orders_user_exchange_idx ON orders (user_id, exchange);
CREATE INDEX IF NOT EXISTS orders_status_idx ON orders (status);

-- ----------------------------------------------------------------------------- fills
-- Every fill, once: (order_id, fill_id) is the venue's trade id per order, so a repeated
-- record_fill can never be stored twice.
CREATE TABLE IF NOT EXISTS fills (
    order_id        UUID            NOT NULL,
    fill_id         VARCHAR(128)    NOT NULL,
    event_id        UUID            NOT NULL UNIQUE,   -- the OrderFilled event
    user_id         VARCHAR(64)     NOT NULL,
    exchange        VARCHAR(32)     NOT NULL,
    symbol          VARCHAR(48)     NOT NULL,
    side            VARCHAR(16)     NOT NULL CHECK (side IN ('buy', 'sell')),
    position_id     UUID,
    quantity        NUMERIC         NOT NULL,
    price           NUMERIC         NOT NULL,
    fee             NUMERIC         NOT NULL DEFAULT 0,
    fee_currency    VARCHAR(32),
    overfill        BOOLEAN         NOT NULL DEFAULT false,
    late            BOOLEAN         NOT NULL DEFAULT false,
    ts              TIMESTAMPTZ     NOT NULL,
    PRIMARY KEY (order_id, fill_id)
);

CREATE INDEX IF NOT EXISTS fills_user_exchange_ts_idx ON fills (user_id, exchange, ts);

-- ----------------------------------------------------------------------------- ledger_events
-- Archive of every event of every shard's `ledger:{s}:events` stream, in log order
-- (shard, entry_ms, entry_seq). Redis entries may be trimmed only once archived here.
CREATE TABLE IF NOT EXISTS ledger_events (
    event_id        UUID            PRIMARY KEY,
    shard           INT             NOT NULL,
    entry_id        VARCHAR(41)     NOT NULL,   -- Redis stream entry id "<ms>-<seq>"
    entry_ms        BIGINT          NOT NULL,
    entry_seq       BIGINT          NOT NULL,
    type            VARCHAR(64)     NOT NULL,
    aggregate_id    UUID            NOT NULL,   -- data.stream: an order id or a position id
    version         INT             NOT NULL,
    command_id      VARCHAR(64),
    user_id         VARCHAR(64)     NOT NULL,
    data            JSONB           NOT NULL,   -- the event's data object as published
    ts              TIMESTAMPTZ     NOT NULL,
    CONSTRAINT ledger_events_entry_key UNIQUE (shard, entry_ms, entry_seq),
    CONSTRAINT ledger_events_aggregate_version_key UNIQUE (aggregate_id, version)
);

CREATE INDEX IF NOT EXISTS ledger_events_user_ts_idx ON ledger_events (user_id, ts);

-- ----------------------------------------------------------------------------- checkpoints
-- Tracking record of each projector per shard: the last stream entry it applied. Written in
-- the same transaction as the rows it produced, so a crash never applies an event twice or
-- skips one.
CREATE TABLE IF NOT EXISTS projector_checkpoints (
    projector       VARCHAR(64)     NOT NULL,
    shard           INT             NOT NULL,
    entry_ms        BIGINT          NOT NULL,
    entry_seq       BIGINT          NOT NULL,
    updated_at      TIMESTAMPTZ     NOT NULL DEFAULT now(),
    PRIMARY KEY (projector, shard)
);

-- ----------------------------------------------------------------------------- projector_gaps
-- Every event entry the projector dead-lettered (it could not be decoded or stored) or skipped
-- (an unknown type whose envelope is unreadable) and every final order it could not rebuild, so
-- that history is never silently missing: the entry, what
-- it was (its type; its event and its order or position when readable), why, and when that
-- order or position reached history after all (filled_at; NULL while it is still missing).
-- `ledger status` reports the open ones.
CREATE TABLE IF NOT EXISTS projector_gaps (
    shard           INT             NOT NULL,
    entry_id        VARCHAR(41)     NOT NULL,   -- Redis stream entry id "<ms>-<seq>"
    entry_ms        BIGINT          NOT NULL,
    entry_seq       BIGINT          NOT NULL,
    type            VARCHAR(64)     NOT NULL,   -- as published, cut to 64 characters
    event_id        UUID,
    aggregate_id    UUID,                       -- data.stream: the order or the position
    code            VARCHAR(32)     NOT NULL,
    reason          TEXT            NOT NULL,
    recorded_at     TIMESTAMPTZ     NOT NULL DEFAULT now(),
    filled_at       TIMESTAMPTZ,
    PRIMARY KEY (shard, entry_ms, entry_seq)
);

-- ----------------------------------------------------------------------------- the hash chain
-- Tamper evidence (ledger/chain.py): every archived event keeps the exact text of its data as
-- appended (data_raw: JSONB reorders keys and drops spaces, so `data` cannot be hashed again),
-- its number in the shard's chain (chain_n: 1, 2, 3 ...) and its hash (chain_hash), as the
-- Redis entry's fields `n` and `hash`. NULL in rows archived before the chain existed.
ALTER TABLE ledger_events ADD COLUMN IF NOT EXISTS data_raw TEXT;
ALTER TABLE ledger_events ADD COLUMN IF NOT EXISTS chain_n BIGINT;
ALTER TABLE ledger_events ADD COLUMN IF NOT EXISTS chain_hash TEXT;

-- ----------------------------------------------------------------------------- ledger_outcomes
-- The first outcome (reply JSON, byte for byte as the append step stored it) of every command
-- whose outcome was compacted in Redis (projections/compact.py): its field in
-- `ledger:{s}:outcomes` then holds a small marker, and a duplicate of the command is answered
-- from here by the command handler (CONTRACT §3: however long after).
CREATE TABLE IF NOT EXISTS ledger_outcomes (
    shard           INT             NOT NULL,
    user_id         VARCHAR(64)     NOT NULL,
    command_id      VARCHAR(64)     NOT NULL,
    reply           TEXT            NOT NULL,
    archived_at     TIMESTAMPTZ     NOT NULL DEFAULT now(),
    PRIMARY KEY (shard, user_id, command_id)
);
