-- kit: a row the bus refuses `bus.relay_max_attempts` times while the bus itself is healthy (a
-- poison row) is set aside instead of blocking the rows behind it; it can be listed and retried
-- (kit::outbox::set_aside, kit::outbox::retry).
alter table outbox add column set_aside_at timestamptz;
drop index if exists outbox_unpublished_idx;
create index outbox_pending_idx on outbox (seq) where published_at is null and set_aside_at is null;
