//! The events the orders service announces, written to its outbox in the transaction of the
//! change: `order.created`, `order.processing`, `order.processed`, `order.shipped`,
//! `order.completed`, `order.failed` and `order.cancelled`. The data is the order as the API
//! shows it, with the status it came from (`previous_status`, absent for `order.created`) and
//! whether catalog's stock already matches that status (`stock_settled`: false when the worker
//! still has to commit, release or return the order's stock).

use kit::outbox::Event;
use serde::Serialize;

use crate::NAME;
use crate::domain::{Order, Status};

#[derive(Serialize)]
struct Changed<'a> {
    #[serde(flatten)]
    order: &'a Order,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_status: Option<Status>,
    stock_settled: bool,
}

/// The event announcing that `order` is now in its status (coming from `previous`), its stock
/// settled or not.
pub fn changed(
    order: &Order,
    previous: Option<Status>,
    stock_settled: bool,
) -> anyhow::Result<Event> {
    Event::new(
        NAME,
        order.status.topic(),
        format!("order:{}", order.id),
        &Changed {
            order,
            previous_status: previous,
            stock_settled,
        },
    )
}
