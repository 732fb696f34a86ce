-- The sweep claims a stale intent (sets `releasing_at`) before releasing its reservation, and an
-- order takes its intent only while it is unclaimed: a create slower than the reservation
-- timeout then fails instead of storing an order whose stock the sweep gave back (oversold).
alter table reservation_intents add column releasing_at timestamptz;
