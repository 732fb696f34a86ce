//! What a user is, and what a valid request to create or change one looks like.

use chrono::{DateTime, Utc};
use kit::FieldError;
use serde::{Deserialize, Serialize};

/// A user as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[schema(example = json!({"id": 1, "username": null, "email": "alice@example.com",
    "name": "Alice Smith", "role": "user", "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-01T00:00:00Z"}))]
pub struct User {
    pub id: i64,
    pub username: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
    /// `user` or `admin`.
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What login reads: never serialised, so the hash cannot reach a response or an event.
#[derive(sqlx::FromRow)]
pub struct Account {
    pub id: i64,
    pub role: String,
    pub password_hash: Option<String>,
}

/// The body of `POST /users`. Every seed's body is accepted: `{name}`, `{username, email}`,
/// `{email, full_name}`, `{name, email}`. Unknown fields are refused (422), so a typo is never
/// silently dropped.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    /// 3 to 32 characters: letters, digits, `_`, `.`, `-`; unique.
    pub username: Option<String>,
    /// Unique, compared without case.
    pub email: Option<String>,
    /// 1 to 100 characters; `full_name` is accepted as its alias (seed 002).
    #[serde(alias = "full_name")]
    pub name: Option<String>,
}

/// The body of `PUT`/`PATCH /users/{id}`: the fields to change. Absent (or `null`) fields keep
/// their value; `PUT` is partial too, because seed 004 sends `PUT {"name": ...}` alone.
pub type UpdateUserBody = CreateUserBody;

/// Validated, normalised fields of a create or update (serialized only as the rows of a batch
/// insert, `store::insert_many`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserFields {
    pub username: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
}

impl CreateUserBody {
    /// Checks every field and reports all problems at once.
    pub fn validate_new(self) -> Result<UserFields, Vec<FieldError>> {
        let (fields, mut errors) = self.normalise();
        if fields.username.is_none()
            && fields.name.is_none()
            && !errors
                .iter()
                .any(|e| e.field == "name" || e.field == "username")
        {
            errors.push(FieldError::new(
                "name",
                "required",
                "give a name (or full_name), a username, or both",
            ));
        }
        if errors.is_empty() {
            Ok(fields)
        } else {
            Err(errors)
        }
    }

    /// Like [`CreateUserBody::validate_new`], for a change: at least one field must be given.
    pub fn validate_update(self) -> Result<UserFields, Vec<FieldError>> {
        let (fields, mut errors) = self.normalise();
        if fields == UserFields::default() && errors.is_empty() {
            errors.push(FieldError::new(
                "body",
                "empty_update",
                "give at least one of username, email, name",
            ));
        }
        if errors.is_empty() {
            Ok(fields)
        } else {
            Err(errors)
        }
    }

    fn normalise(self) -> (UserFields, Vec<FieldError>) {
        let mut errors = Vec::new();
        let username = self
            .username
            .and_then(|u| check(parse_username(&u), "username", &mut errors));
        let email = self
            .email
            .and_then(|e| check(parse_email(&e), "email", &mut errors));
        let name = self
            .name
            .and_then(|n| check(parse_name(&n), "name", &mut errors));
        (
            UserFields {
                username,
                email,
                name,
            },
            errors,
        )
    }
}

fn check(
    result: Result<String, (&'static str, String)>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match result {
        Ok(value) => Some(value),
        Err((code, message)) => {
            errors.push(FieldError::new(field, code, message));
            None
        }
    }
}

/// 3 to 32 characters: letters, digits, `_`, `.`, `-`.
pub fn parse_username(raw: &str) -> Result<String, (&'static str, String)> {
    let value = raw.trim();
    let len = value.chars().count();
    if !(3..=32).contains(&len) {
        return Err(("length", "must be 3 to 32 characters".into()));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err((
            "invalid_characters",
            "may contain only letters, digits, _, . and -".into(),
        ));
    }
    Ok(value.to_owned())
}

/// A plausible address (`local@domain.tld`, at most 254 characters), stored lowercased so
/// uniqueness ignores case.
pub fn parse_email(raw: &str) -> Result<String, (&'static str, String)> {
    let value = raw.trim().to_lowercase();
    let valid = value.len() <= 254
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        && match value.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && local.len() <= 64
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.contains("..")
            }
            None => false,
        };
    if valid {
        Ok(value)
    } else {
        Err(("invalid_email", "is not a valid email address".into()))
    }
}

/// 1 to 100 characters after trimming, no control characters.
pub fn parse_name(raw: &str) -> Result<String, (&'static str, String)> {
    let value = raw.trim();
    let len = value.chars().count();
    if len == 0 {
        return Err(("required", "must not be empty".into()));
    }
    if len > 100 {
        return Err(("length", "must be at most 100 characters".into()));
    }
    if value.chars().any(char::is_control) {
        return Err((
            "invalid_characters",
            "must not contain control characters".into(),
        ));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_body_is_valid() {
        let bodies = [
            r#"{"name": "Alice"}"#,
            r#"{"username": "alice", "email": "alice@example.com"}"#,
            r#"{"email": "alice@example.com", "full_name": "Alice"}"#,
            r#"{"name": "Alice Smith", "email": "alice@example.com"}"#,
        ];
        for body in bodies {
            let parsed: CreateUserBody = serde_json::from_str(body).expect(body);
            assert!(parsed.validate_new().is_ok(), "{body}");
        }
    }

    #[test]
    fn invalid_fields_are_all_reported() {
        let body = CreateUserBody {
            username: Some("a b".into()),
            email: Some("not-an-email".into()),
            name: Some("   ".into()),
        };
        let errors = body.validate_new().expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["username", "email", "name"]);
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            parse_email(" Alice@Example.COM ").as_deref().ok(),
            Some("alice@example.com")
        );
        for bad in [
            "", "a", "a@b", "@b.c", "a@b..c", "a@.b.c", "a b@c.d", "a@b@c.d",
        ] {
            assert!(parse_email(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn usernames_are_checked() {
        assert!(parse_username("alice_01").is_ok());
        for bad in ["al", "a".repeat(33).as_str(), "al ice", "alice!"] {
            assert!(parse_username(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_user_needs_a_name_or_username() {
        let body = CreateUserBody {
            email: Some("a@b.co".into()),
            ..Default::default()
        };
        let errors = body.validate_new().expect_err("needs a name");
        assert_eq!(errors[0].code, "required");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let result: Result<CreateUserBody, _> = serde_json::from_str(r#"{"name":"a","nmae":"b"}"#);
        assert!(result.is_err());
    }
}
