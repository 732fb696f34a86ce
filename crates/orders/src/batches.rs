//! The writes of concurrent creates, done together ([`kit::batch`]): the intents of the
//! reservations about to be asked for are one statement, and the orders stored on their
//! reservations are one transaction (one commit for the whole batch; on PostgreSQL the orders
//! with their lines one statement, their `order.created` events another).
//!
//! A batch that fails (a statement refused, the connection lost) is done again one order at a
//! time, each in its own transaction ([`kit::batch::together_or_alone`]), so each request gets
//! its own answer and one bad order does not fail the others. Doing it again is safe: a batch
//! that failed wrote nothing, and an order whose batch did commit after all finds its intent
//! taken and is not stored twice (its request is told to send it again, as when its own commit
//! is lost).

use kit::Db;
use kit::batch::Batcher;
use kit::db::query;
use kit::money::Money;

use crate::domain::{Item, Order, Status};
use crate::error::{Error, Result};
use crate::store::{self, NewOrder};

/// The most orders one batch holds.
const PER_BATCH: usize = 64;

/// An order to store on its reservation, with what its request needs written with it.
pub struct Placement {
    pub user_id: i64,
    pub items: Vec<Item>,
    pub total: Money,
    pub client_total: Option<Money>,
    pub warning: Option<String>,
    pub reservation_id: String,
    /// The request's `Idempotency-Key`: answered with the order, in its transaction.
    pub key: Option<String>,
}

/// Where concurrent creates hand their writes.
pub struct Batches {
    intents: Batcher<String, Result<()>>,
    placements: Batcher<Placement, Result<Option<Order>>>,
}

impl Batches {
    /// Must be called inside a Tokio runtime.
    pub fn new(db: &Db) -> Self {
        let flushers = kit::batch::flushers_for(db);
        let intents = {
            let db = db.clone();
            Batcher::new(flushers, PER_BATCH, move |ids| intents(db.clone(), ids))
        };
        let placements = {
            let db = db.clone();
            Batcher::new(flushers, PER_BATCH, move |orders| place(db.clone(), orders))
        };
        Self {
            intents,
            placements,
        }
    }

    /// Stores the intent of `reservation_id` (committed when this returns).
    pub async fn intent(&self, reservation_id: String) -> Result<()> {
        self.intents
            .submit(reservation_id)
            .await
            .map_err(anyhow::Error::from)?
    }

    /// Stores the order on its reservation; `None`, and nothing stored, when the sweep claimed
    /// its intent first (see `create.rs`).
    pub async fn place(&self, placement: Placement) -> Result<Option<Order>> {
        self.placements
            .submit(placement)
            .await
            .map_err(anyhow::Error::from)?
    }
}

async fn intents(db: Db, ids: Vec<String>) -> Vec<Result<()>> {
    let db = &db;
    kit::batch::together_or_alone(
        &ids,
        |all| async move {
            match store::insert_intents(db, all).await {
                Ok(()) => Some(all.iter().map(|_| Ok(())).collect()),
                Err(err) => {
                    tracing::debug!(error.message = %kit::ApiError::from(err), count = all.len(),
                        "a batch of intents failed; storing them one at a time");
                    None
                }
            }
        },
        |id| store::insert_intents(db, std::slice::from_ref(id)),
    )
    .await
}

async fn place(db: Db, orders: Vec<Placement>) -> Vec<Result<Option<Order>>> {
    let db = &db;
    kit::batch::together_or_alone(
        &orders,
        |all| async move {
            match place_together(db, all).await {
                Ok(stored) => Some(stored.into_iter().map(Ok).collect()),
                Err(err) => {
                    tracing::debug!(error.message = %kit::ApiError::from(err), count = all.len(),
                        "a batch of orders failed; storing them one at a time");
                    None
                }
            }
        },
        |order| async move {
            let mut stored = place_together(db, std::slice::from_ref(order)).await?;
            Ok(stored.pop().flatten())
        },
    )
    .await
}

/// Stores `orders` in one transaction: all of them, or (an error) none.
async fn place_together(db: &Db, orders: &[Placement]) -> Result<Vec<Option<Order>>> {
    let mut tx = db.begin().await?;
    let mut announced = Vec::with_capacity(orders.len());
    let new: Vec<NewOrder> = orders
        .iter()
        .map(|order| NewOrder {
            id: None,
            user_id: order.user_id,
            status: Status::Pending,
            items: &order.items,
            total: order.total,
            client_total: order.client_total,
            warning: order.warning.clone(),
            reservation_id: Some(&order.reservation_id),
            announce: true,
        })
        .collect();
    // Each with its intent: if the request was slower than the reservation timeout, the sweep
    // may have claimed it and be giving the stock back; storing the order then would sell
    // stock that is not held. One statement for them all on PostgreSQL.
    let stored = store::insert_reserved_many(&mut tx, &new, &mut announced).await?;
    for (order, placed) in orders.iter().zip(&stored) {
        if let (Some(placed), Some(key)) = (placed, &order.key) {
            let body = serde_json::to_string(placed).map_err(anyhow::Error::from)?;
            query(
                "update idempotency_keys set status_code = 201, body = $1, order_id = $2 \
                 where key = $3",
            )
            .bind(body)
            .bind(placed.id)
            .bind(key)
            .execute(&mut tx)
            .await?;
        }
    }
    // Every order's `order.created` in one statement.
    kit::outbox::enqueue(&mut tx, &announced).await?;
    tx.commit().await.map_err(Error::from)?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use kit::testing::{Backend, TestEnv};

    use super::*;

    fn placement(reservation_id: &str, lines: &[(i64, i64)]) -> Placement {
        let unit_price = Money::from_cents(500);
        let items: Vec<Item> = lines
            .iter()
            .map(|&(product_id, quantity)| Item {
                product_id,
                quantity,
                unit_price,
                line_total: unit_price.times(quantity).expect("in range"),
            })
            .collect();
        let total = items.iter().fold(Money::default(), |t, i| {
            t.plus(i.line_total).expect("in range")
        });
        Placement {
            user_id: 1,
            items,
            total,
            client_total: None,
            warning: None,
            reservation_id: reservation_id.to_owned(),
            key: None,
        }
    }

    async fn count(db: &Db, sql: &str) -> i64 {
        query(sql).fetch_scalar(db).await.expect("count")
    }

    /// A batch where one write fails is written again one at a time: the others are stored
    /// and answered, the failing one gets its error; an order whose intent the sweep claimed is
    /// not stored, without failing the others.
    async fn one_bad_write_does_not_fail_its_batch(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("orderbatch").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");

        let ids = ["ord-a", "ord-b", "ord-a", "ord-c", "ord-d"].map(str::to_owned);
        let stored = intents(db.clone(), ids.to_vec()).await;
        let failed: Vec<bool> = stored.iter().map(Result::is_err).collect();
        assert_eq!(
            failed,
            [false, false, true, false, false],
            "{backend:?}: only the repeated intent fails"
        );
        assert_eq!(
            count(&db, "select count(*) from reservation_intents").await,
            4
        );

        assert!(store::claim_intent(&db, "ord-b").await.expect("claim"));
        let orders = vec![
            placement("ord-a", &[(1, 2)]),
            placement("ord-b", &[(1, 1)]),
            // The same product twice: its lines break the table's key.
            placement("ord-c", &[(2, 1), (2, 1)]),
            placement("ord-d", &[(1, 1), (3, 4)]),
        ];
        let placed = place(db.clone(), orders).await;
        let outcome: Vec<&str> = placed
            .iter()
            .map(|p| match p {
                Ok(Some(_)) => "stored",
                Ok(None) => "intent claimed",
                Err(_) => "failed",
            })
            .collect();
        assert_eq!(
            outcome,
            ["stored", "intent claimed", "failed", "stored"],
            "{backend:?}"
        );
        for order in placed.iter().flatten().flatten() {
            let found = store::find(&db, order.id).await.expect("find");
            assert_eq!(
                found.as_ref(),
                Some(order),
                "{backend:?}: stored as answered"
            );
        }
        assert_eq!(count(&db, "select count(*) from orders").await, 2);
        assert_eq!(count(&db, "select count(*) from order_items").await, 3);
        assert_eq!(
            count(&db, "select count(*) from outbox").await,
            2,
            "{backend:?}: one order.created per order stored"
        );
        env.drop_kit_db("orderbatch", db).await;
    }

    kit::on_both_backends!(one_bad_write_does_not_fail_its_batch);
}
