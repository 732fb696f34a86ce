-- /api/v1/orders/stats reads the most recently processed orders: an index instead of a scan of
-- every order (25 ms at 38,000 orders, growing with the table).
create index orders_processed_idx on orders (processed_at) where processed_at is not null;
