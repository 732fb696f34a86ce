-- Accounts (SQLite dialect of migrations/postgres/0002_accounts.sql): a password (argon2id PHC
-- string, null for users created without one) and a role.
alter table users add column password_hash text;
alter table users add column role text not null default 'user' check (role in ('user', 'admin'));
