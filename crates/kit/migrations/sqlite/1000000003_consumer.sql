-- kit: the event consumer's tables (SQLite dialect of migrations/postgres; see there).
create table consumed_messages (
    consumer text not null,
    message_id text not null,
    processed_at text not null,
    primary key (consumer, message_id)
);
create index consumed_messages_processed_idx on consumed_messages (processed_at);

create table dead_letters (
    id integer primary key autoincrement,
    consumer text not null,
    message_id text not null,
    topic text not null,
    payload text not null,
    attempts integer not null,
    last_error text not null,
    dead_at text not null,
    unique (consumer, message_id)
);
