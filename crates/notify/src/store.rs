//! The notification service's queries, written once for both backends (see `kit::db`).

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::Db;
use kit::db::{Dialect, Executor, query};
use serde::Serialize;

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

const COLUMNS: &str = "id, event_id, event_type, channel, recipient, user_id, subject, body, \
                       payload, status, attempts, retries, last_error, next_attempt_at, \
                       created_at, updated_at, sent_at";

/// A delivery, as stored and as the API shows it (the event's JSON only to the dispatcher).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Notification {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub channel: String,
    pub recipient: String,
    pub user_id: Option<i64>,
    pub subject: String,
    pub body: String,
    #[serde(skip)]
    #[schema(ignore)]
    pub payload: String,
    pub status: String,
    pub attempts: i32,
    pub retries: i32,
    pub last_error: Option<String>,
    /// When a pending delivery is due (a claimed one: when its claim lapses).
    pub next_attempt_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// A delivery to record.
pub struct NewNotification<'a> {
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub channel: &'a str,
    pub recipient: &'a str,
    pub user_id: Option<i64>,
    pub subject: &'a str,
    pub body: &'a str,
    pub payload: &'a str,
    /// `failed` at once when it can never be delivered (no address), with why.
    pub failed: Option<&'a str>,
}

/// Records a delivery unless this (event, channel, recipient) has one; returns whether it did.
pub async fn insert(ex: impl Executor<'_>, new: &NewNotification<'_>) -> sqlx::Result<bool> {
    let now = now();
    let status = if new.failed.is_some() {
        "failed"
    } else {
        "pending"
    };
    let added = query(
        "insert into notifications (event_id, event_type, channel, recipient, user_id, subject, \
         body, payload, status, attempts, last_error, next_attempt_at, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $11, $11) \
         on conflict (event_id, channel, recipient) do nothing",
    )
    .bind(new.event_id)
    .bind(new.event_type)
    .bind(new.channel)
    .bind(new.recipient)
    .bind(new.user_id)
    .bind(new.subject)
    .bind(new.body)
    .bind(new.payload)
    .bind(status)
    .bind(new.failed)
    .bind(now)
    .execute(ex)
    .await?;
    Ok(added == 1)
}

/// PostgreSQL: [`insert`] for many deliveries, in one statement (as one JSON array, so every
/// count is one statement text), recorded in the order given; returns how many it recorded.
pub async fn insert_many(ex: impl Executor<'_>, all: &[NewNotification<'_>]) -> sqlx::Result<u64> {
    let rows: Vec<serde_json::Value> = all
        .iter()
        .map(|new| {
            serde_json::json!({
                "event_id": new.event_id,
                "event_type": new.event_type,
                "channel": new.channel,
                "recipient": new.recipient,
                "user_id": new.user_id,
                "subject": new.subject,
                "body": new.body,
                "payload": new.payload,
                "failed": new.failed,
            })
        })
        .collect();
    query(
        "insert into notifications (event_id, event_type, channel, recipient, user_id, subject, \
         body, payload, status, attempts, last_error, next_attempt_at, created_at, updated_at) \
         select n.event_id, n.event_type, n.channel, n.recipient, n.user_id, n.subject, n.body, \
         n.payload, case when n.failed is null then 'pending' else 'failed' end, 0, n.failed, \
         $2, $2, $2 from jsonb_to_recordset($1::jsonb) as n (event_id text, event_type text, \
         channel text, recipient text, user_id bigint, subject text, body text, payload text, \
         failed text) \
         on conflict (event_id, channel, recipient) do nothing",
    )
    .bind(serde_json::Value::from(rows).to_string())
    .bind(now())
    .execute(ex)
    .await
}

pub async fn find(ex: impl Executor<'_>, id: i64) -> sqlx::Result<Option<Notification>> {
    query(&format!(
        "select {COLUMNS} from notifications where id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await
}

/// A page of deliveries, newest first, with the count of all that match.
pub async fn list(
    db: &Db,
    user_id: Option<i64>,
    status: Option<&str>,
    limit: i64,
    offset: i64,
) -> sqlx::Result<(Vec<Notification>, i64)> {
    let filter = "($1 is null or user_id = $1) and ($2 is null or status = $2)";
    let rows = query(&format!(
        "select {COLUMNS} from notifications where {filter} order by id desc limit $3 offset $4"
    ))
    .bind(user_id)
    .bind(status)
    .bind(limit)
    .bind(offset)
    .fetch_all(db)
    .await?;
    let total = query(&format!(
        "select count(*) from notifications where {filter}"
    ))
    .bind(user_id)
    .bind(status)
    .fetch_scalar(db)
    .await?;
    Ok((rows, total))
}

/// When the earliest pending delivery is due (a claimed one: when its claim lapses).
pub async fn next_due(db: &Db) -> sqlx::Result<Option<DateTime<Utc>>> {
    query(
        "select next_attempt_at from notifications where status = 'pending' \
         order by next_attempt_at limit 1",
    )
    .fetch_optional_scalar(db)
    .await
}

/// Claims up to `limit` pending deliveries due now, oldest due first, for one try each: counts
/// the attempt and moves their due time to `lease_until`, so no other dispatcher takes them
/// meanwhile (on PostgreSQL it skips rows another dispatcher is claiming; a row claimed by
/// someone else just before is no longer due). One statement; the claimed rows as they are now.
pub async fn claim_due(
    db: &Db,
    limit: i64,
    lease_until: DateTime<Utc>,
) -> sqlx::Result<Vec<Notification>> {
    let sql = format!(
        "update notifications set attempts = attempts + 1, next_attempt_at = $1, updated_at = $2 \
         where id in (select id from notifications \
             where status = 'pending' and next_attempt_at <= $2 \
             order by next_attempt_at, id limit $3{}) \
         and status = 'pending' and next_attempt_at <= $2 \
         returning {COLUMNS}",
        db.dialect().skip_locked()
    );
    let mut claimed: Vec<Notification> = query(&sql)
        .bind(lease_until)
        .bind(now())
        .bind(limit)
        .fetch_all(db)
        .await?;
    // `returning` keeps no order: deliver them in the order they were recorded.
    claimed.sort_by_key(|n| n.id);
    Ok(claimed)
}

/// Sent, all of `ids` (one statement).
pub async fn mark_sent(db: &Db, ids: &[i64]) -> sqlx::Result<()> {
    let now = now();
    let (each, ids) = match db.dialect() {
        Dialect::Postgres => ("= any($2::bigint[])", kit::db::id_array(ids)),
        Dialect::Sqlite => (
            "in (select value from json_each($2))",
            serde_json::to_string(ids).map_err(|err| sqlx::Error::Encode(err.into()))?,
        ),
    };
    query(&format!(
        "update notifications set status = 'sent', sent_at = $1, updated_at = $1 \
         where id {each} and status = 'pending'"
    ))
    // Planned at each run, so the planner sees how few the ids are: a plan kept from when the
    // table was small scans every delivery.
    .planned_each_run()
    .bind(now)
    .bind(ids)
    .execute(db)
    .await?;
    Ok(())
}

/// A try failed: due again at `retry_at`, or `failed` for good when `None`.
pub async fn mark_attempt_failed(
    db: &Db,
    id: i64,
    error: &str,
    retry_at: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    let now = now();
    let status = if retry_at.is_some() {
        "pending"
    } else {
        "failed"
    };
    query(
        "update notifications set status = $1, last_error = $2, next_attempt_at = $3, \
         updated_at = $4 where id = $5 and status = 'pending'",
    )
    .bind(status)
    .bind(error)
    .bind(retry_at.unwrap_or(now))
    .bind(now)
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// A failed delivery made pending again, due now, with a new round of tries. `false`: it was
/// not failed (any more).
pub async fn retry(db: &Db, id: i64) -> sqlx::Result<bool> {
    let now = now();
    let changed = query(
        "update notifications set status = 'pending', attempts = 0, retries = retries + 1, \
         next_attempt_at = $1, updated_at = $1 where id = $2 and status = 'failed'",
    )
    .bind(now)
    .bind(id)
    .execute(db)
    .await?;
    Ok(changed == 1)
}

/// `(channel, status, count)` over the deliveries, of one user when given.
pub async fn counts(db: &Db, user_id: Option<i64>) -> sqlx::Result<Vec<(String, String, i64)>> {
    query(
        "select channel, status, count(*) from notifications where ($1 is null or user_id = $1) \
         group by channel, status order by channel, status",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// The oldest pending delivery's creation time.
pub async fn oldest_pending(db: &Db) -> sqlx::Result<Option<DateTime<Utc>>> {
    query(
        "select created_at from notifications where status = 'pending' \
         order by created_at limit 1",
    )
    .fetch_optional_scalar(db)
    .await
}

#[cfg(test)]
mod tests {
    use kit::testing::{Backend, TestEnv};

    use super::*;

    fn delivery<'a>(event_id: &'a str, failed: Option<&'a str>) -> NewNotification<'a> {
        NewNotification {
            event_id,
            event_type: "order.created",
            channel: "log",
            recipient: "ada@example.com",
            user_id: Some(1),
            subject: "subject",
            body: "body",
            payload: "{}",
            failed,
        }
    }

    /// Dispatchers claiming at once share the due deliveries: each claimed once, its attempt
    /// counted once; a delivery not yet due, or no longer pending, is not claimed.
    async fn concurrent_claims_take_each_due_delivery_once(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("notifyclaim").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let ids: Vec<String> = (0..30).map(|i| format!("event-{i}")).collect();
        for id in &ids {
            assert!(insert(&db, &delivery(id, None)).await.expect("insert"));
        }
        assert!(
            insert(&db, &delivery("event-failed", Some("no address")))
                .await
                .expect("insert")
        );
        insert(&db, &delivery("event-later", None))
            .await
            .expect("insert");
        query("update notifications set next_attempt_at = $1 where event_id = 'event-later'")
            .bind(now() + chrono::Duration::hours(1))
            .execute(&db)
            .await
            .expect("later");

        let lease = now() + chrono::Duration::minutes(5);
        let claims = futures::future::join_all((0..4).map(|_| claim_due(&db, 8, lease))).await;
        let mut claimed: Vec<Notification> =
            claims.into_iter().flat_map(|c| c.expect("claim")).collect();
        // Whatever the first four left (a claim skips rows another one holds).
        loop {
            let more = claim_due(&db, 8, lease).await.expect("claim");
            if more.is_empty() {
                break;
            }
            claimed.extend(more);
        }
        let mut events: Vec<&str> = claimed.iter().map(|n| n.event_id.as_str()).collect();
        events.sort_unstable();
        let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(events, expected, "{backend:?}: every due delivery, once");
        assert!(
            claimed
                .iter()
                .all(|n| n.attempts == 1 && n.next_attempt_at == lease && n.status == "pending"),
            "{backend:?}: answered as claimed"
        );
        let attempts: i64 = query("select sum(attempts) from notifications")
            .fetch_scalar(&db)
            .await
            .expect("attempts");
        assert_eq!(attempts, 30, "{backend:?}: one attempt counted per claim");

        // Sent together: the pending ones named, and only them (a failed one stays failed).
        let failed: i64 = query("select id from notifications where event_id = 'event-failed'")
            .fetch_scalar(&db)
            .await
            .expect("failed id");
        let sent: Vec<i64> = claimed.iter().take(3).map(|n| n.id).collect();
        mark_sent(&db, &[&sent[..], &[failed]].concat())
            .await
            .expect("mark sent");
        let statuses: Vec<(String, i64)> =
            query("select status, count(*) from notifications group by status order by status")
                .fetch_all(&db)
                .await
                .expect("statuses");
        assert_eq!(
            statuses,
            [
                ("failed".to_owned(), 1),
                ("pending".to_owned(), 28),
                ("sent".to_owned(), 3)
            ],
            "{backend:?}"
        );
        env.drop_kit_db("notifyclaim", db).await;
    }

    /// Deliveries recorded together (a group of events, PostgreSQL) are stored as `insert`
    /// stores each, in the order given; one recorded before, or twice in the group, is
    /// recorded once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_recorded_together_are_stored_as_alone() {
        let mut env = TestEnv::new(Backend::Postgres).await;
        let db = env.kit_db("notifymany").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        assert!(
            insert(&db, &delivery("event-0", None))
                .await
                .expect("insert")
        );
        let mut group = vec![
            delivery("event-0", None),
            delivery("event-1", None),
            delivery("event-2", Some("no address")),
            delivery("event-1", None),
        ];
        group[1].user_id = None;
        assert_eq!(insert_many(&db, &group).await.expect("insert many"), 2);
        assert!(
            insert(&db, &delivery("event-3", None))
                .await
                .expect("insert after")
        );
        let stored: Vec<Notification> =
            query(&format!("select {COLUMNS} from notifications order by id"))
                .fetch_all(&db)
                .await
                .expect("stored");
        let shown: Vec<(&str, &str, Option<&str>, Option<i64>)> = stored
            .iter()
            .map(|n| {
                (
                    n.event_id.as_str(),
                    n.status.as_str(),
                    n.last_error.as_deref(),
                    n.user_id,
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("event-0", "pending", None, Some(1)),
                ("event-1", "pending", None, None),
                ("event-2", "failed", Some("no address"), Some(1)),
                ("event-3", "pending", None, Some(1)),
            ]
        );
        let (alone, together) = (&stored[3], &stored[1]);
        for n in [alone, together] {
            assert_eq!(
                (
                    n.event_type.as_str(),
                    n.channel.as_str(),
                    n.recipient.as_str()
                ),
                ("order.created", "log", "ada@example.com")
            );
            assert_eq!(
                (n.subject.as_str(), n.body.as_str(), n.payload.as_str()),
                ("subject", "body", "{}")
            );
            assert_eq!((n.attempts, n.retries, n.sent_at), (0, 0, None));
            assert_eq!(n.next_attempt_at, n.created_at, "due at once");
        }
        env.drop_kit_db("notifymany", db).await;
    }

    kit::on_both_backends!(concurrent_claims_take_each_due_delivery_once);
}
