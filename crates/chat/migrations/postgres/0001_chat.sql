-- The chat service: chats, their participants and their messages, in the service's own schema.

-- `last_seq` is the sequence number of the chat's latest message: posting a message increments
-- it in the message's own transaction (the row lock orders concurrent posts, so sequence order is
-- commit order and a cursor over `seq` never skips a message committed later).
create table chats (
    id text primary key,
    name text not null,
    metadata text not null,
    last_seq bigint not null default 0,
    created_at timestamptz not null
);

-- Keyed like the DynamoDB table (chat id + participant id); the index answers "chats of a
-- participant" (the GSI on DynamoDB).
create table chat_participants (
    chat_id text not null references chats (id) on delete cascade,
    participant_id text not null,
    joined_at timestamptz not null,
    primary key (chat_id, participant_id)
);

create index chat_participants_participant_idx on chat_participants (participant_id, chat_id);

create table chat_messages (
    chat_id text not null references chats (id) on delete cascade,
    seq bigint not null,
    id text not null unique,
    sender_id text not null,
    text text not null,
    created_at timestamptz not null,
    primary key (chat_id, seq)
);
