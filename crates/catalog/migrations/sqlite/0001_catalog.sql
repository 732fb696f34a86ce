-- The catalog (SQLite dialect of migrations/postgres/0001_catalog.sql; see there for why).
create table products (
    id integer primary key autoincrement,
    sku text not null unique,
    name text not null,
    description text not null default '',
    category text,
    price_cents integer not null check (price_cents >= 0),
    stock integer not null check (stock >= 0),
    reserved integer not null default 0 check (reserved >= 0),
    low_stock_threshold integer not null check (low_stock_threshold >= 0),
    created_at text not null,
    updated_at text not null
);

create index products_category_idx on products (lower(category), id);

create table reservations (
    order_id text primary key,
    status text not null check (status in ('reserved', 'committed', 'released')),
    created_at text not null,
    updated_at text not null
);

create table reservation_items (
    order_id text not null references reservations (order_id),
    product_id integer not null,
    quantity integer not null check (quantity > 0),
    unit_price_cents integer not null check (unit_price_cents >= 0),
    primary key (order_id, product_id)
);
