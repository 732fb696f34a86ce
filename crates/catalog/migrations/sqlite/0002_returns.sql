-- See migrations/postgres/0002_returns.sql.
create table reservation_returns (
    order_id text primary key references reservations (order_id),
    returned_at text not null
);
