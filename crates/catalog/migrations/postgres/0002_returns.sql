-- A committed reservation whose units came back (the order was cancelled after it was sold):
-- one row per order, so returning twice puts the units back once.
create table reservation_returns (
    order_id text primary key references reservations (order_id),
    returned_at timestamptz not null
);
