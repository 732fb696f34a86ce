-- The notification service (SQLite dialect of migrations/postgres/0001_notify.sql; see there).
create table notifications (
    id integer primary key autoincrement,
    event_id text not null,
    event_type text not null,
    channel text not null check (channel in ('log', 'smtp', 'webhook')),
    recipient text not null,
    user_id integer,
    subject text not null,
    body text not null,
    payload text not null,
    status text not null check (status in ('pending', 'sent', 'failed')),
    attempts integer not null default 0,
    retries integer not null default 0,
    last_error text,
    next_attempt_at text not null,
    created_at text not null,
    updated_at text not null,
    sent_at text,
    unique (event_id, channel, recipient)
);

create index notifications_due_idx on notifications (next_attempt_at) where status = 'pending';
create index notifications_user_idx on notifications (user_id, id);
create index notifications_status_idx on notifications (status, id);
