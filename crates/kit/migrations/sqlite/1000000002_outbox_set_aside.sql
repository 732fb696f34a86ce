-- kit: poison outbox rows are set aside (SQLite dialect of migrations/postgres; see there).
alter table outbox add column set_aside_at text;
drop index if exists outbox_unpublished_idx;
create index outbox_pending_idx on outbox (seq) where published_at is null and set_aside_at is null;
