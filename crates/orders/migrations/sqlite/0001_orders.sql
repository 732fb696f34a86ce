-- The orders service (SQLite dialect of migrations/postgres/0001_orders.sql; see there for why).
create table orders (
    id integer primary key autoincrement,
    user_id integer not null,
    status text not null check (status in ('pending', 'processing', 'processed', 'shipped',
        'completed', 'failed', 'cancelled')),
    total_cents integer not null check (total_cents >= 0),
    client_total_cents integer,
    warning text,
    failure_reason text,
    reservation_id text unique,
    stock_settled integer not null default 1,
    created_at text not null,
    updated_at text not null,
    processed_at text
);

create index orders_user_idx on orders (user_id, id);
create index orders_status_idx on orders (status, id);
create index orders_unsettled_idx on orders (updated_at) where not stock_settled;

create table order_items (
    order_id integer not null references orders (id),
    product_id integer not null,
    quantity integer not null check (quantity > 0),
    unit_price_cents integer not null check (unit_price_cents >= 0),
    primary key (order_id, product_id)
);

create table reservation_intents (
    reservation_id text primary key,
    created_at text not null
);

create table idempotency_keys (
    key text primary key,
    request text not null,
    status_code integer,
    body text,
    order_id integer,
    created_at text not null,
    expires_at text not null
);
create index idempotency_keys_expiry_idx on idempotency_keys (expires_at);
