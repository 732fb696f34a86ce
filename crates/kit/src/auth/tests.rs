use super::*;

fn settings() -> AuthSettings {
    let mut auth = crate::Settings::defaults().auth;
    auth.jwt_secret = Some(Secret::new("k".repeat(40)));
    auth
}

/// A token signed with `secret` over `claims` with `alg`.
fn forge(alg: Algorithm, secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn claims(auth: &AuthSettings) -> serde_json::Value {
    let now = unix_now();
    serde_json::json!({
        "sub": "7", "role": "user", "iss": auth.issuer, "aud": auth.audience,
        "iat": now, "exp": now + 600,
    })
}

fn b64(bytes: &[u8]) -> String {
    // URL-safe base64 without padding, as JWTs use.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn issued_tokens_verify_with_their_subject_and_role() {
    let tokens = Tokens::new(&settings()).expect("tokens");
    let issued = tokens.issue(42, Role::Admin).expect("issue");
    assert_eq!(issued.token_type, "Bearer");
    assert_eq!(issued.expires_in, 3600);
    let identity = tokens.verify(&issued.access_token).expect("valid");
    assert_eq!(
        identity,
        Identity {
            user_id: 42,
            role: Role::Admin
        }
    );
}

#[test]
fn bad_tokens_are_refused() {
    let auth = settings();
    let tokens = Tokens::new(&auth).expect("tokens");
    let key = auth.jwt_secret.as_ref().expect("key").expose().to_owned();
    let good = forge(Algorithm::HS256, &key, &claims(&auth));
    assert!(tokens.verify(&good).is_ok(), "the control case verifies");

    let mut tampered_claims = claims(&auth);
    tampered_claims["role"] = "admin".into();
    let (head, rest) = good.split_once('.').expect("jwt");
    let signature = rest.rsplit_once('.').expect("jwt").1;
    let tampered = format!(
        "{head}.{}.{signature}",
        b64(tampered_claims.to_string().as_bytes())
    );

    let mut expired = claims(&auth);
    expired["exp"] = (unix_now() - 3600).into();
    let mut wrong_issuer = claims(&auth);
    wrong_issuer["iss"] = "someone-else".into();
    let mut wrong_audience = claims(&auth);
    wrong_audience["aud"] = "another-api".into();
    let mut no_exp = claims(&auth);
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut bad_subject = claims(&auth);
    bad_subject["sub"] = "alice".into();
    let mut bad_role = claims(&auth);
    bad_role["role"] = "root".into();
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(&auth).to_string().as_bytes())
    );
    let cases = [
        ("tampered payload", tampered),
        ("expired", forge(Algorithm::HS256, &key, &expired)),
        ("wrong issuer", forge(Algorithm::HS256, &key, &wrong_issuer)),
        (
            "wrong audience",
            forge(Algorithm::HS256, &key, &wrong_audience),
        ),
        ("alg none", alg_none),
        (
            "another algorithm (HS512)",
            forge(Algorithm::HS512, &key, &claims(&auth)),
        ),
        (
            "another key",
            forge(Algorithm::HS256, &"x".repeat(40), &claims(&auth)),
        ),
        ("no exp", forge(Algorithm::HS256, &key, &no_exp)),
        (
            "subject not an id",
            forge(Algorithm::HS256, &key, &bad_subject),
        ),
        ("unknown role", forge(Algorithm::HS256, &key, &bad_role)),
        ("garbage", "not.a.token".to_owned()),
        ("empty", String::new()),
        ("huge", "a".repeat(MAX_TOKEN_CHARS + 1)),
    ];
    use jsonwebtoken::errors::ErrorKind;
    // The reasons, so each case fails for the reason it tests (not, say, a bad encoding).
    let expected = [
        Some(ErrorKind::InvalidSignature),
        Some(ErrorKind::ExpiredSignature),
        Some(ErrorKind::InvalidIssuer),
        Some(ErrorKind::InvalidAudience),
        None,
        Some(ErrorKind::InvalidAlgorithm),
        Some(ErrorKind::InvalidSignature),
        None, // no exp: refused when the claims are read
    ];
    for (i, (case, token)) in cases.into_iter().enumerate() {
        let result = tokens.verify(&token);
        assert!(result.is_err(), "{case} must be refused");
        if let (Some(kind), Err(TokenError::Invalid(err))) =
            (expected.get(i).cloned().flatten(), &result)
        {
            assert_eq!(err.kind(), &kind, "{case}");
        } else if let Some(Some(kind)) = expected.get(i) {
            panic!("{case}: expected {kind:?}, got {result:?}");
        }
    }
}

/// A token that verified is answered from the memo while it is unexpired (its `exp` plus the
/// leeway), never after; a refused token is never remembered; tokens sharing a slot never
/// answer for each other.
#[test]
fn verified_tokens_are_remembered_until_they_expire() {
    let auth = settings();
    let tokens = Tokens::new(&auth).expect("tokens");
    let key = auth.jwt_secret.as_ref().expect("key").expose().to_owned();
    let claims = claims(&auth);
    let exp = claims["exp"].as_u64().expect("exp");
    let good = forge(Algorithm::HS256, &key, &claims);
    let identity = tokens.verify(&good).expect("valid");
    let memo = &tokens.0.verified;
    assert_eq!(memo.get(&good, unix_now()), Some(identity));
    assert_eq!(memo.get(&good, exp + LEEWAY_SECS), Some(identity));
    assert_eq!(memo.get(&good, exp + LEEWAY_SECS + 1), None, "expired");
    assert_eq!(tokens.verify(&good).expect("valid"), identity);

    // `verify` answers from the memo (a string that would never verify, remembered as if it
    // had), and only while the entry is unexpired.
    memo.remember("not.a.token", identity, unix_now() + 600);
    assert_eq!(tokens.verify("not.a.token").ok(), Some(identity));
    memo.remember("not.a.token", identity, unix_now() - LEEWAY_SECS - 5);
    assert!(
        tokens.verify("not.a.token").is_err(),
        "an expired entry is verified again, and refused"
    );

    let forged = forge(Algorithm::HS256, &"x".repeat(40), &claims);
    assert!(tokens.verify(&forged).is_err());
    assert_eq!(
        memo.get(&forged, unix_now()),
        None,
        "refused: not remembered"
    );

    // More tokens than slots: each still answers with its own subject.
    let issued: Vec<(i64, String)> = (0..(2 * VERIFIED_SLOTS as i64))
        .map(|id| {
            (
                id,
                tokens.issue(id, Role::User).expect("issue").access_token,
            )
        })
        .collect();
    for _ in 0..2 {
        for (id, token) in &issued {
            assert_eq!(tokens.verify(token).expect("valid").user_id, *id);
        }
    }
}

#[test]
fn tokens_of_the_previous_key_verify_during_a_rotation() {
    let old = Tokens::new(&settings()).expect("old");
    let token = old.issue(3, Role::User).expect("issue").access_token;
    let mut rotated = settings();
    rotated.previous_jwt_secret = rotated.jwt_secret.take();
    rotated.jwt_secret = Some(Secret::new("n".repeat(40)));
    let new = Tokens::new(&rotated).expect("new");
    assert_eq!(new.verify(&token).expect("still valid").user_id, 3);
    let fresh = new.issue(4, Role::User).expect("issue").access_token;
    assert!(
        old.verify(&fresh).is_err(),
        "the old key knows nothing newer"
    );
    rotated.previous_jwt_secret = None;
    assert!(
        Tokens::new(&rotated)
            .expect("after")
            .verify(&token)
            .is_err(),
        "once the previous key is gone, its tokens are too"
    );
}

#[test]
fn a_missing_or_short_key_is_refused_by_name() {
    let mut auth = settings();
    auth.jwt_secret = None;
    let err = Tokens::new(&auth).err().expect("refused").to_string();
    assert!(
        err.contains("auth.jwt_secret") && err.contains("AGORA_AUTH__JWT_SECRET"),
        "{err}"
    );
    let err = auth
        .require_service_token()
        .expect_err("refused")
        .to_string();
    assert!(err.contains("auth.service_token"), "{err}");
    for key in ["jwt_secret", "previous_jwt_secret", "service_token"] {
        let mut auth = settings();
        let short = Some(Secret::new("short"));
        match key {
            "jwt_secret" => auth.jwt_secret = short,
            "previous_jwt_secret" => auth.previous_jwt_secret = short,
            _ => auth.service_token = short,
        }
        let err = auth.validate().expect_err(key).to_string();
        assert!(err.contains(&format!("auth.{key}")), "{err}");
    }
}

#[test]
fn secrets_never_print() {
    let secret = Secret::new("hunter2-hunter2-hunter2-hunter2-hunter2");
    assert_eq!(format!("{secret:?}"), "***");
    assert_eq!(
        serde_json::to_string(&secret).expect("serialises"),
        r#""***""#
    );
    let auth = settings();
    let debug = format!("{auth:?}");
    assert!(!debug.contains(&"k".repeat(40)), "{debug}");
    assert!(secret.matches(b"hunter2-hunter2-hunter2-hunter2-hunter2"));
    assert!(!secret.matches(b"hunter2"));
}

#[test]
fn a_secret_file_is_created_once_owner_only_and_read_back() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("secrets/jwt_secret");
    let first = load_or_create_secret(&path).expect("created");
    assert!(first.expose().len() >= MIN_SECRET_CHARS);
    let again = load_or_create_secret(&path).expect("read");
    assert_eq!(first.expose(), again.expose(), "kept across restarts");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        load_or_create_secret(&path).expect("read");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "narrowed again");
    }
    std::fs::write(&path, "short").expect("write");
    assert!(
        load_or_create_secret(&path).is_err(),
        "a short secret is refused"
    );
}

// Two Ed25519 key pairs (openssl genpkey -algorithm ed25519), for tests only.
const ED1_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKcamT+naxbsSHOyLkQ3syuYZ+5NTRwPFReFsRugfD7E\n-----END PRIVATE KEY-----\n";
const ED1_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA5lT8cql3QuQLFVWpkKQ6NUFUXzfXm+GO+4u7IR2Z6hw=\n-----END PUBLIC KEY-----\n";
const ED2_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEILL6A6YacrpgVZX+LHnyDefGYNFtHUTtrL/XSpHF4pdO\n-----END PRIVATE KEY-----\n";
const ED2_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAOH7yIS502GIMI9wXfCJXoaSYwdQC4N///sRU0N1pBXw=\n-----END PUBLIC KEY-----\n";

fn ed25519(private: Option<&str>, public: &str) -> AuthSettings {
    let mut auth = settings();
    auth.ed25519_public_key = Some(public.to_owned());
    auth.ed25519_private_key = private.map(|k| Secret::new(k.to_owned()));
    auth
}

/// With an Ed25519 pair, users signs EdDSA tokens and a verifier holding only the public key
/// (the gateway) accepts them, cannot sign any, and refuses HS256 tokens, even ones signed with
/// the configured `jwt_secret` (no algorithm confusion).
#[test]
fn ed25519_tokens_are_signed_by_the_private_key_and_verified_with_the_public_one() {
    let signer = Tokens::new(&ed25519(Some(ED1_PRIVATE), ED1_PUBLIC)).expect("signer");
    let verifier = Tokens::new(&ed25519(None, ED1_PUBLIC)).expect("verifier");
    assert!(signer.can_sign());
    assert!(!verifier.can_sign());
    let token = signer.issue(42, Role::Admin).expect("issued").access_token;
    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    let identity = verifier
        .verify(&token)
        .expect("verified with the public key");
    assert_eq!((identity.user_id, identity.role), (42, Role::Admin));
    assert!(
        verifier.issue(1, Role::User).is_err(),
        "a verifier cannot sign"
    );

    let auth = ed25519(None, ED1_PUBLIC);
    let secret = auth
        .jwt_secret
        .as_ref()
        .expect("secret")
        .expose()
        .to_owned();
    let hs = forge(Algorithm::HS256, &secret, &claims(&auth));
    assert!(verifier.verify(&hs).is_err(), "HS256 refused under EdDSA");
    let other = Tokens::new(&ed25519(Some(ED2_PRIVATE), ED2_PUBLIC)).expect("other pair");
    let foreign = other.issue(42, Role::Admin).expect("issued").access_token;
    assert!(
        verifier.verify(&foreign).is_err(),
        "another key's token refused"
    );
}

/// Rotation: tokens of the previous key pair are accepted while `previous_ed25519_public_key`
/// names it; without it they are not.
#[test]
fn a_previous_ed25519_public_key_keeps_old_tokens_valid() {
    let old = Tokens::new(&ed25519(Some(ED1_PRIVATE), ED1_PUBLIC)).expect("old signer");
    let token = old.issue(7, Role::User).expect("issued").access_token;
    let mut rotated = ed25519(Some(ED2_PRIVATE), ED2_PUBLIC);
    assert!(Tokens::new(&rotated).expect("new").verify(&token).is_err());
    rotated.previous_ed25519_public_key = Some(ED1_PUBLIC.to_owned());
    let tokens = Tokens::new(&rotated).expect("rotated");
    assert_eq!(tokens.verify(&token).expect("old token").user_id, 7);
}

/// A wrong key is a start-up error naming it: not PEM, not Ed25519, a private key that is not
/// the public key's pair, or a private key with no public key.
#[test]
fn bad_ed25519_keys_are_refused_by_name() {
    let key_of = |err: ConfigError| match err {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("unexpected {other:?}"),
    };
    let garbage = ed25519(None, "not a key");
    assert_eq!(
        key_of(garbage.validate().expect_err("garbage")),
        "auth.ed25519_public_key"
    );
    let swapped = ed25519(Some(ED1_PUBLIC), ED1_PUBLIC);
    assert_eq!(
        key_of(
            swapped
                .validate()
                .expect_err("a public key as the private one")
        ),
        "auth.ed25519_private_key"
    );
    let mismatched = ed25519(Some(ED2_PRIVATE), ED1_PUBLIC);
    assert!(mismatched.validate().is_ok(), "each key parses alone");
    assert_eq!(
        key_of(Tokens::new(&mismatched).err().expect("mismatch")),
        "auth.ed25519_private_key"
    );
    let mut alone = settings();
    alone.ed25519_private_key = Some(Secret::new(ED1_PRIVATE.to_owned()));
    assert_eq!(
        key_of(alone.validate().expect_err("no public key")),
        "auth.ed25519_private_key"
    );
}
