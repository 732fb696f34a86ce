-- The chat service (SQLite dialect of migrations/postgres/0001_chat.sql; see there).
create table chats (
    id text primary key,
    name text not null,
    metadata text not null,
    last_seq integer not null default 0,
    created_at text not null
);

create table chat_participants (
    chat_id text not null references chats (id) on delete cascade,
    participant_id text not null,
    joined_at text not null,
    primary key (chat_id, participant_id)
);

create index chat_participants_participant_idx on chat_participants (participant_id, chat_id);

create table chat_messages (
    chat_id text not null references chats (id) on delete cascade,
    seq integer not null,
    id text not null unique,
    sender_id text not null,
    text text not null,
    created_at text not null,
    primary key (chat_id, seq)
);
