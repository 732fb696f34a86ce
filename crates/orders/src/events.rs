//! The events the orders service announces, written to its outbox in the transaction of the
//! change: `order.created`, `order.processing`, `order.processed`, `order.shipped`,
//! `order.completed`, `order.failed` and `order.cancelled`. The data is the order as the API
//! shows it, with the status it came from (`previous_status`, absent for `order.created`).

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
}

/// The event announcing that `order` is now in its status (coming from `previous`).
pub fn changed(order: &Order, previous: Option<Status>) -> anyhow::Result<Event> {
    Event::new(
        NAME,
        order.status.topic(),
        format!("order:{}", order.id),
        &Changed {
            order,
            previous_status: previous,
        },
    )
}
