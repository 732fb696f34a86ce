-- SQLite dialect of migrations/postgres/0002_intent_claim.sql; see there for why.
alter table reservation_intents add column releasing_at text;
