//! Typed, layered configuration: built-in defaults → `agora.toml` → environment.
//!
//! One [`Settings`] value describes the whole system; each service reads its own slice
//! ([`Settings::service`]). Backends are chosen by URL: no `database.url` means SQLite files under
//! `data_dir`, a `postgres://` URL means PostgreSQL; no `redis.url` means the in-process cache.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use url::Url;

/// The defaults compiled into every binary; see the file for what each key does.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The whole system's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub host: IpAddr,
    pub data_dir: PathBuf,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub cache: CacheSettings,
    pub bus: BusSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// Where `/metrics` is served: a private listener per service, not the public port.
    pub metrics: MetricsSettings,
    /// Accounts and tokens: mode, issuer, audience, keys (see [`crate::auth`]).
    pub auth: crate::auth::AuthSettings,
    pub services: BTreeMap<String, ServiceSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: Option<String>,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    pub migrate_on_start: bool,
    /// PostgreSQL: a statement running longer is cancelled (0 = no limit). Migrations are exempt.
    pub statement_timeout_ms: u64,
    /// PostgreSQL: a session idle inside a transaction this long is ended (0 = no limit).
    pub idle_in_transaction_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    pub url: Option<String>,
    pub prefix: String,
    pub timeout_ms: u64,
    pub retry_after_ms: u64,
}

/// The event bus the outbox relay publishes to: in process, or NATS JetStream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusSettings {
    /// Unset: the in-process bus. `nats://...`: NATS JetStream.
    pub url: Option<String>,
    /// Names everything Agora creates on the bus: the stream `<PREFIX>_EVENTS` and subjects
    /// `<prefix>.events.<topic>`. Tests give each run its own.
    pub prefix: String,
    /// How often the outbox relay looks for unpublished events when nothing wakes it sooner.
    pub relay_poll_ms: u64,
    /// Events the relay publishes per round.
    pub relay_batch: u32,
    /// A publish (JetStream ack included) slower than this counts as failed and is retried.
    pub publish_timeout_ms: u64,
    /// Published outbox rows are deleted after this many hours (0 keeps them forever).
    pub outbox_retention_hours: u64,
    /// An outbox row refused this many times by a bus that is up is set aside (a poison row).
    pub relay_max_attempts: u32,
    /// A consumer's handler failing this many times on one message dead-letters it.
    pub consumer_max_attempts: u32,
    /// The first retry of a failed message waits this long; each next one twice as long...
    pub consumer_backoff_ms: u64,
    /// ... up to this.
    pub consumer_backoff_max_ms: u64,
    /// Ids of handled messages are kept this long to skip redeliveries (0 keeps them forever).
    pub consumer_dedupe_hours: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub item_ttl_secs: u64,
    pub list_ttl_secs: u64,
    pub max_memory_mb: u64,
    /// On Redis, how long this process serves its own copy of an entry it read, between the
    /// invalidations Redis pushes (0: every read asks Redis).
    pub near_ttl_ms: u64,
    /// Members (pages × filters) a list group holds at once; more are served uncached until
    /// the group expires or is invalidated.
    pub max_group_members: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub body_limit_bytes: usize,
    pub request_timeout_secs: u64,
    /// A request head must be complete this long after its connection opened or its previous
    /// response was sent (so it is also how long an idle keep-alive connection is kept).
    pub header_read_timeout_secs: u64,
    /// Connections served at once per listener; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// After a shutdown signal, `/ready` answers 503 and the listener keeps accepting this long,
    /// so that a balancer sees the 503 and stops sending before connections are refused.
    pub shutdown_drain_secs: u64,
    pub shutdown_grace_secs: u64,
}

/// The private listener of `/metrics` (one per service process).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Interface of the metrics listeners (loopback by default: only the machine itself, or a
    /// Prometheus beside it, scrapes).
    pub host: IpAddr,
    /// A service's metrics port is its port plus this, unless `services.<name>.metrics_port`
    /// says otherwise; a service on port 0 (a free one) gets a free metrics port too.
    pub port_offset: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Pretty,
    Json,
}

/// Per-service settings. Service-specific keys (if a service has any) live in `extra`; the
/// service reads them as its own typed struct with [`Settings::section`], so this crate never
/// needs to know about them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceSettings {
    pub port: u16,
    #[serde(default)]
    pub upstreams: Vec<Url>,
    /// PostgreSQL schema (default: the service name). Tests give each run its own.
    #[serde(default)]
    pub schema: Option<String>,
    /// Where its `/metrics` is served (default: `port` + `metrics.port_offset`, on
    /// `metrics.host`).
    #[serde(default)]
    pub metrics_port: Option<u16>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, figment::value::Value>,
}

/// A configuration error; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// Which database a service runs on, derived from `database.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseBackend {
    /// One file per service under the data dir.
    Sqlite { path: PathBuf },
    /// One schema per service in this database.
    Postgres { url: String, schema: String },
}

impl Settings {
    /// Loads defaults, then `path` (if it exists; `agora.toml` by convention), then environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = path {
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(figment.merge(env_provider()))
    }

    /// Defaults only, untouched by files and environment: the base of every test configuration.
    pub fn defaults() -> Self {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_TOML)))
            .expect("the built-in default.toml is valid")
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: URL schemes, route targets, sane numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        if let Some(url) = &self.database.url {
            let parsed = Url::parse(url)
                .map_err(|e| invalid("database.url (DATABASE_URL)", format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                return Err(invalid(
                    "database.url (DATABASE_URL)",
                    format!(
                        "unsupported scheme `{}`: use postgres://, or unset it for SQLite",
                        parsed.scheme()
                    ),
                ));
            }
        }
        if let Some(url) = &self.redis.url {
            let parsed = Url::parse(url)
                .map_err(|e| invalid("redis.url (REDIS_URL)", format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "redis" | "rediss") {
                return Err(invalid(
                    "redis.url (REDIS_URL)",
                    format!(
                        "unsupported scheme `{}`: use redis://, or unset it for the in-process cache",
                        parsed.scheme()
                    ),
                ));
            }
        }
        if let Some(url) = &self.bus.url {
            let parsed = Url::parse(url)
                .map_err(|e| invalid("bus.url (NATS_URL)", format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "nats" | "tls") {
                return Err(invalid(
                    "bus.url (NATS_URL)",
                    format!(
                        "unsupported scheme `{}`: use nats://, or unset it for the in-process bus",
                        parsed.scheme()
                    ),
                ));
            }
        }
        if self.bus.prefix.is_empty()
            || !self
                .bus
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(invalid(
                "bus.prefix",
                "use letters, digits and _ only".into(),
            ));
        }
        for (key, value) in [
            ("bus.relay_batch", u64::from(self.bus.relay_batch)),
            ("bus.relay_poll_ms", self.bus.relay_poll_ms),
            (
                "bus.relay_max_attempts",
                u64::from(self.bus.relay_max_attempts),
            ),
            (
                "bus.consumer_max_attempts",
                u64::from(self.bus.consumer_max_attempts),
            ),
            ("bus.consumer_backoff_ms", self.bus.consumer_backoff_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if self.bus.consumer_backoff_max_ms < self.bus.consumer_backoff_ms {
            return Err(invalid(
                "bus.consumer_backoff_max_ms",
                "must be at least bus.consumer_backoff_ms".into(),
            ));
        }
        if self.database.max_connections == 0 {
            return Err(invalid(
                "database.max_connections",
                "must be at least 1".into(),
            ));
        }
        if self.http.body_limit_bytes == 0 {
            return Err(invalid(
                "http.body_limit_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.cache.max_memory_mb == 0 {
            return Err(invalid("cache.max_memory_mb", "must be at least 1".into()));
        }
        let shortest_ttl_ms = [self.cache.item_ttl_secs, self.cache.list_ttl_secs]
            .into_iter()
            .filter(|&ttl| ttl > 0)
            .min()
            .map(|secs| secs.saturating_mul(1000));
        if let Some(shortest) = shortest_ttl_ms
            && self.cache.near_ttl_ms > shortest
        {
            return Err(invalid(
                "cache.near_ttl_ms",
                format!(
                    "{} is longer than the shortest cache TTL ({shortest} ms): a copy would \
                     outlive its entry",
                    self.cache.near_ttl_ms
                ),
            ));
        }
        if self.metrics.port_offset == 0 {
            return Err(invalid(
                "metrics.port_offset",
                "must be at least 1 (0 would put /metrics on the public port)".into(),
            ));
        }
        self.auth.validate()?;
        for (name, service) in &self.services {
            let metrics = self.metrics_addr(name).port();
            if metrics != 0 && metrics == service.port {
                return Err(invalid(
                    &format!("services.{name}.metrics_port"),
                    format!("{metrics} is the service's public port"),
                ));
            }
            if let Some(schema) = &service.schema
                && !is_identifier(schema)
            {
                return Err(invalid(
                    &format!("services.{name}.schema"),
                    "use lowercase letters, digits and _ only".into(),
                ));
            }
        }
        Ok(())
    }

    /// The typed settings of service `name`: the keys of `[services.<name>]` other than `port`,
    /// `upstreams` and `schema`, as `T` (give it `#[serde(default, deny_unknown_fields)]` so
    /// absent keys take their defaults and misspelt ones are refused). The error names the key.
    pub fn section<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, ConfigError> {
        let extra = self
            .services
            .get(name)
            .map(|s| s.extra.clone())
            .unwrap_or_default();
        figment::value::Value::from(extra)
            .deserialize::<T>()
            .map_err(|err| {
                let key = std::iter::once(format!("services.{name}"))
                    .chain(err.path.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(".");
                ConfigError::Invalid {
                    key,
                    message: err.kind.to_string(),
                }
            })
    }

    /// The settings of one service (an empty default for a service the file does not list).
    pub fn service(&self, name: &str) -> ServiceSettings {
        self.services.get(name).cloned().unwrap_or_default()
    }

    /// Where the service listens.
    pub fn bind_addr(&self, service: &str) -> SocketAddr {
        SocketAddr::new(self.host, self.service(service).port)
    }

    /// Where the service serves `/metrics`: `metrics.host`, and `services.<name>.metrics_port`
    /// or its port plus `metrics.port_offset` (port 0, a free port, stays 0).
    pub fn metrics_addr(&self, service: &str) -> SocketAddr {
        let settings = self.service(service);
        let port = settings
            .metrics_port
            .unwrap_or_else(|| match settings.port {
                0 => 0,
                port => port.saturating_add(self.metrics.port_offset),
            });
        SocketAddr::new(self.metrics.host, port)
    }

    /// The URLs the gateway (or another service) uses to reach `service`.
    pub fn upstreams(&self, service: &str) -> Vec<Url> {
        let settings = self.service(service);
        if !settings.upstreams.is_empty() {
            return settings.upstreams;
        }
        let addr = self.bind_addr(service);
        vec![Url::parse(&format!("http://{addr}")).expect("socket address makes a valid URL")]
    }

    /// The database `service` runs on.
    pub fn database_backend(&self, service: &str) -> DatabaseBackend {
        match &self.database.url {
            Some(url) => DatabaseBackend::Postgres {
                url: url.clone(),
                schema: self
                    .service(service)
                    .schema
                    .unwrap_or_else(|| service.to_owned()),
            },
            None => DatabaseBackend::Sqlite {
                path: self.data_dir.join(format!("{service}.db")),
            },
        }
    }
}

/// `AGORA_SECTION__KEY` variables, plus the standard `DATABASE_URL`, `REDIS_URL`, `NATS_URL`.
fn env_provider() -> Figment {
    Figment::new()
        .merge(Env::prefixed("AGORA_").split("__"))
        .merge(
            Env::raw()
                .only(&["DATABASE_URL", "REDIS_URL", "NATS_URL"])
                .map(|key| match key.as_str() {
                    "DATABASE_URL" => "database.url".into(),
                    "REDIS_URL" => "redis.url".into(),
                    _ => "bus.url".into(),
                }),
        )
}

/// A safe SQL identifier: lowercase ASCII letters, digits and `_`, not starting with a digit.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_choose_embedded_backends() {
        let settings = Settings::defaults();
        assert_eq!(settings.bind_addr("gateway").port(), 8080);
        assert_eq!(
            settings.database_backend("users"),
            DatabaseBackend::Sqlite {
                path: PathBuf::from("./data/users.db")
            }
        );
        assert!(settings.redis.url.is_none());
        assert_eq!(settings.cache.item_ttl_secs, 300);
        assert_eq!(settings.cache.list_ttl_secs, 60);
        assert_eq!(
            settings.metrics_addr("users"),
            "127.0.0.1:9081".parse().expect("addr"),
            "metrics on a private port: the service's plus metrics.port_offset"
        );
    }

    #[test]
    fn file_then_environment_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "agora.toml",
                "[cache]\nitem_ttl_secs = 10\nlist_ttl_secs = 5\n",
            )?;
            jail.set_env("AGORA_CACHE__ITEM_TTL_SECS", "20");
            jail.set_env("DATABASE_URL", "postgres://postgres@127.0.0.1/agora");
            jail.set_env("REDIS_URL", "redis://127.0.0.1:6379");
            let settings = Settings::load(Some(Path::new("agora.toml"))).expect("loads");
            assert_eq!(settings.cache.item_ttl_secs, 20, "env beats file");
            assert_eq!(settings.cache.list_ttl_secs, 5, "file beats defaults");
            assert_eq!(
                settings.database_backend("users"),
                DatabaseBackend::Postgres {
                    url: "postgres://postgres@127.0.0.1/agora".into(),
                    schema: "users".into()
                }
            );
            assert_eq!(
                settings.redis.url.as_deref(),
                Some("redis://127.0.0.1:6379")
            );
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_bad_key() {
        let cases = [
            ("AGORA_CACHE__ITEM_TTL_SECS", "soon", "item_ttl_secs"),
            ("DATABASE_URL", "mysql://localhost/x", "database.url"),
            ("REDIS_URL", "not a url", "redis.url"),
            (
                "AGORA_DATABASE__MAX_CONNECTIONS",
                "0",
                "database.max_connections",
            ),
            // Longer than the list TTL (60 s): a near copy would outlive its entry.
            ("AGORA_CACHE__NEAR_TTL_MS", "61000", "cache.near_ttl_ms"),
        ];
        for (var, value, key) in cases {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let err = Settings::load(None)
                    .expect_err(var)
                    .to_string()
                    .to_lowercase();
                assert!(
                    err.contains(key),
                    "{var}={value}: `{err}` should name `{key}`"
                );
                Ok(())
            });
        }
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(is_identifier("users"));
        assert!(is_identifier("t_1700000000_ab12"));
        assert!(!is_identifier("Users"));
        assert!(!is_identifier("users; drop"));
        assert!(!is_identifier("1abc"));
    }
}
