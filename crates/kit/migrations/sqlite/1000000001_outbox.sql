-- kit: the transactional outbox (SQLite dialect of migrations/postgres; see there).
create table if not exists outbox (
    seq integer primary key autoincrement,
    id text not null unique,
    topic text not null,
    key text not null,
    payload text not null,
    created_at text not null,
    published_at text,
    attempts integer not null default 0,
    last_error text
);
create index if not exists outbox_unpublished_idx on outbox (seq) where published_at is null;
