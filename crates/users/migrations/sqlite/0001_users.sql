-- Users of Agora (SQLite dialect of migrations/postgres/0001_users.sql).
-- autoincrement: ids are never reused, as with PostgreSQL identity columns.
create table users (
    id integer primary key autoincrement,
    username text unique,
    email text unique,
    name text,
    created_at text not null,
    updated_at text not null
);

create index users_name_idx on users (name, id);
