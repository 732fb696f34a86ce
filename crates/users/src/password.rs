//! Passwords: a type that cannot be printed, and argon2id hashing off the async runtime.
//!
//! Argon2 is deliberately slow (tens of milliseconds of CPU and ~19 MiB per hash). On a runtime
//! worker it would stall every request sharing that worker, and unbounded `spawn_blocking` would
//! let a login flood start hundreds of hashes at once (hundreds of threads, gigabytes of memory).
//! So each hash runs on a blocking thread behind a semaphore of `auth.hash_concurrency` permits;
//! requests beyond it wait asynchronously, costing nothing while they wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Argon2, PasswordHasher as _, PasswordVerifier as _};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::sync::Semaphore;

/// Fewest characters a new password may have.
pub const MIN_CHARS: usize = 8;
/// Most characters a password may have (a bound on what is hashed).
pub const MAX_CHARS: usize = 128;

/// A password as received. Its `Debug` hides it; it is not `Serialize`, so it cannot end up in a
/// response or an event; it is wiped from memory when dropped.
pub struct Password(SecretString);

impl Password {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// `MIN_CHARS` to `MAX_CHARS` characters (`min` false: only the upper bound, for login).
    pub fn check(&self, min: bool) -> Result<(), (&'static str, String)> {
        let len = self.0.expose_secret().chars().count();
        if len > MAX_CHARS || (min && len < MIN_CHARS) || len == 0 {
            return Err((
                "length",
                format!("must be {MIN_CHARS} to {MAX_CHARS} characters"),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

impl<'de> serde::Deserialize<'de> for Password {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Password::new)
    }
}

/// Hashes and verifies passwords on a bounded set of blocking threads. Cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    /// A hash of a random password with the same parameters, verified against when the email is
    /// unknown, so that a failed login costs the same whether the account exists or not.
    dummy: Arc<String>,
    verifications: Arc<AtomicU64>,
}

impl Hasher {
    /// At most `concurrency` hashes at once; computes the dummy hash (one hash's time).
    pub async fn new(concurrency: usize) -> anyhow::Result<Self> {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let random = kit::auth::Secret::generate()?;
        let dummy = run(&permits, {
            let password = Password::new(random.expose());
            move || hash_blocking(&password)
        })
        .await?;
        Ok(Self {
            permits,
            dummy: Arc::new(dummy),
            verifications: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The argon2id PHC string of `password`, with a fresh random salt.
    pub async fn hash(&self, password: Password) -> anyhow::Result<String> {
        run(&self.permits, move || hash_blocking(&password)).await
    }

    /// True when `password` matches `hash`. With no hash (no such user, or one without a
    /// password) it is verified against the dummy hash and is false: the same work either way.
    pub async fn verify(&self, password: Password, hash: Option<String>) -> anyhow::Result<bool> {
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy.as_str().to_owned());
        let matches = run(&self.permits, move || {
            let parsed =
                PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            Ok(Argon2::default()
                .verify_password(password.0.expose_secret().as_bytes(), &parsed)
                .is_ok())
        })
        .await?;
        Ok(known && matches)
    }

    /// Verifications run so far (tests check that an unknown email costs one too).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }
}

fn hash_blocking(password: &Password) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).context("reading a random salt")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    Argon2::default()
        .hash_password(password.0.expose_secret().as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
}

/// Runs `work` on a blocking thread once a permit is free. The permit moves into the thread, so
/// a request cancelled meanwhile (client gone, timeout) still holds it until the hash is done:
/// the bound is on threads actually working, not on requests still waiting.
async fn run<T: Send + 'static>(
    permits: &Arc<Semaphore>,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let permit = permits
        .clone()
        .acquire_owned()
        .await
        .context("the hashing pool is closed")?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .context("the hashing thread panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_never_show_the_password() {
        let hasher = Hasher::new(1).await.expect("hasher");
        let hash = hasher
            .hash(Password::new("correct horse"))
            .await
            .expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        let ok = |p: &str, h: Option<String>| hasher.verify(Password::new(p), h);
        assert!(
            ok("correct horse", Some(hash.clone()))
                .await
                .expect("verify")
        );
        assert!(!ok("wrong horse", Some(hash.clone())).await.expect("verify"));
        assert!(!ok("correct horse", None).await.expect("verify"));
        assert_eq!(
            hasher.verifications(),
            3,
            "an unknown user costs a verification too"
        );
        assert_eq!(
            format!("{:?}", Password::new("correct horse")),
            "Password(***)"
        );
    }

    #[tokio::test]
    async fn no_more_hashes_run_at_once_than_the_bound() {
        let permits = Arc::new(Semaphore::new(2));
        let running = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let jobs = (0..8).map(|_| {
            let (running, peak) = (running.clone(), peak.clone());
            run(&permits, move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            })
        });
        for result in futures::future::join_all(jobs).await {
            result.expect("job");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn lengths_are_bounded() {
        assert!(Password::new("short").check(true).is_err());
        assert!(Password::new("short").check(false).is_ok());
        assert!(Password::new("long enough").check(true).is_ok());
        assert!(
            Password::new("x".repeat(MAX_CHARS + 1))
                .check(false)
                .is_err()
        );
        assert!(Password::new("").check(false).is_err());
    }
}
