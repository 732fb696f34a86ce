//! The events the users service announces, written to its outbox in the transaction of the
//! change.
//!
//! | type | when | data |
//! |---|---|---|
//! | `user.registered` | an account was created (`POST /api/v1/auth/register`) | the user, as the API returns it: no password, no hash |

use kit::outbox::Event;

use crate::NAME;
use crate::domain::User;

pub fn user_registered(user: &User) -> anyhow::Result<Event> {
    // `User` has no password field: the hash lives only in `Account`, which is not `Serialize`.
    Event::new(NAME, "user.registered", format!("user:{}", user.id), user)
}
