-- Accounts (issue 11): a password and a role. password_hash is an argon2id PHC string
-- ($argon2id$v=19$m=...,t=...,p=...$salt$hash); null for users created without a password
-- (POST /api/v1/users, the seeds), who cannot log in. Never returned by the API.
alter table users add column password_hash text;
alter table users add column role text not null default 'user' check (role in ('user', 'admin'));
