//! Property tests of everything that reads attacker-controlled bytes before
//! a key is verified: token parsing and its checksum, HTTP Basic decoding,
//! credential extraction from a header map, and the identity-header rewrite.
//!
//! The promises: nothing panics on any input; what was issued parses back to
//! the same id and digest; every small corruption of a valid token is
//! refused before any store lookup; a spoofed identity header never survives
//! the rewrite.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::auth::{CredentialError, CredentialExtractor, CredentialSource, VerifiedKey};
use keygate::config::Config;
use keygate::key::{Digest, KeyId, TokenError, TokenFormat, CHECK_LEN, ID_LEN, SECRET_LEN};
use keygate::proxy::headers::{ConnectionInfo, HeaderRules};
use keygate::proxy::routes::RouteTable;
use keygate::store::{Access, AccountRole, KeyRecord, OwnerType};
use proptest::prelude::*;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn format() -> TokenFormat {
    TokenFormat::new("kg")
}

fn extractor() -> CredentialExtractor {
    CredentialExtractor::new(format(), HeaderName::from_static("x-api-key"))
}

/// A freshly issued token. Generation uses the OS CSPRNG, so proptest cannot
/// shrink it; the strategies below vary what is done *to* it instead.
fn issued() -> (KeyId, String, Digest) {
    let (id, token, digest) = format().generate();
    (id, token.expose().to_string(), digest)
}

/// Where the secret+check part of a `kg_` token starts.
const SECRET_AT: usize = 2 + 1 + ID_LEN + 1;

fn basic(payload: &[u8]) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(payload)
    )
}

fn headers(pairs: &[(HeaderName, HeaderValue)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(k.clone(), v.clone());
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary bytes never panic the parser, and anything it accepts is
    /// exactly `kg_<id>_<secret><check>` with the id and secret it reports.
    #[test]
    fn parse_never_panics_and_accepts_only_the_exact_shape(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        if let Ok(parsed) = format().parse(&bytes) {
            prop_assert_eq!(bytes.len(), format().token_len());
            prop_assert_eq!(&bytes[..3], b"kg_");
            prop_assert_eq!(parsed.id.as_str().as_bytes(), &bytes[3..3 + ID_LEN]);
            prop_assert_eq!(
                parsed.digest,
                Digest::of(&bytes[SECRET_AT..SECRET_AT + SECRET_LEN])
            );
        }
    }

    /// Random bytes shaped like a token (right length, right separators,
    /// right alphabets) still only pass when the checksum really matches:
    /// about one in 2^32, so in practice never.
    #[test]
    fn well_shaped_tokens_with_random_checks_are_refused(
        id in proptest::collection::vec(proptest::sample::select(b"0123456789abcdefghjkmnpqrstvwxyz".to_vec()), ID_LEN),
        rest in proptest::collection::vec(proptest::sample::select(BASE62.to_vec()), SECRET_LEN + CHECK_LEN),
    ) {
        let mut token = b"kg_".to_vec();
        token.extend_from_slice(&id);
        token.push(b'_');
        token.extend_from_slice(&rest);
        prop_assert_eq!(format().parse(&token).err(), Some(TokenError::Checksum));
    }

    /// Issued tokens round-trip under any valid prefix: same id, same digest.
    #[test]
    fn issued_tokens_round_trip_under_any_prefix(prefix in "[a-z0-9]{1,12}") {
        let f = TokenFormat::new(&prefix);
        let (id, token, digest) = f.generate();
        let parsed = f.parse(token.expose().as_bytes()).expect("an issued token parses");
        prop_assert_eq!(parsed.id, id);
        prop_assert_eq!(parsed.digest, digest);
        // The same key under a different prefix is someone else's format.
        let other = TokenFormat::new(&format!("{prefix}x"));
        prop_assert!(other.parse(token.expose().as_bytes()).is_err());
    }

    /// Any one byte replaced by any other byte, anywhere: refused.
    #[test]
    fn every_substitution_is_refused(at in 0usize..58, byte in any::<u8>()) {
        let (_, token, _) = issued();
        let mut t = token.into_bytes();
        prop_assume!(t[at] != byte);
        t[at] = byte;
        prop_assert!(format().parse(&t).is_err());
    }

    /// Insertions, deletions and truncations change the length: refused.
    #[test]
    fn insertions_and_deletions_are_refused(at in 0usize..58, byte in any::<u8>(), delete in any::<bool>()) {
        let (_, token, _) = issued();
        let mut t = token.into_bytes();
        if delete { t.remove(at); } else { t.insert(at, byte); }
        prop_assert!(format().parse(&t).is_err());
    }

    /// Swapping two different characters (the classic typo), or corrupting
    /// up to four consecutive bytes of the checked part (a burst CRC-32 always
    /// detects): refused.
    #[test]
    fn transpositions_and_bursts_are_refused(
        at in 0usize..(SECRET_AT + SECRET_LEN - 4),
        burst in proptest::collection::vec(any::<u8>(), 1..=4),
        swap in any::<bool>(),
    ) {
        let (_, token, _) = issued();
        let original = token.into_bytes();
        let mut t = original.clone();
        if swap {
            t.swap(at, at + 1);
        } else {
            for (i, b) in burst.iter().enumerate() {
                t[at + i] = *b;
            }
        }
        prop_assume!(t != original);
        prop_assert!(format().parse(&t).is_err());
    }

    /// Changing the case of any letter is a different token: refused (ids
    /// are lowercase only, secrets are case-sensitive base62).
    #[test]
    fn case_changes_are_refused(at in 3usize..58) {
        let (_, token, _) = issued();
        let mut t = token.into_bytes();
        prop_assume!(t[at].is_ascii_alphabetic());
        t[at] = if t[at].is_ascii_lowercase() { t[at].to_ascii_uppercase() } else { t[at].to_ascii_lowercase() };
        prop_assert!(format().parse(&t).is_err());
    }

    /// Basic `<id>:<secret><check>` round-trips, whatever the scheme's case
    /// and the whitespace around it.
    #[test]
    fn basic_round_trips(scheme in "[Bb][Aa][Ss][Ii][Cc]", pad_before in " {0,3}", pad_after in " {0,3}") {
        let (id, token, digest) = issued();
        let payload = format!("{}:{}", id, &token[SECRET_AT..]);
        let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
        let value = format!("{pad_before}{scheme} {encoded}{pad_after}");
        let h = headers(&[(AUTHORIZATION, HeaderValue::from_str(&value).unwrap())]);
        let credential = extractor().extract(&h).expect("a valid Basic pair");
        prop_assert_eq!(credential.token.id, id);
        prop_assert_eq!(credential.token.digest, digest);
        prop_assert_eq!(credential.source, CredentialSource::Authorization);
    }

    /// Any Basic payload (any bytes, any length, base64 or not) never panics,
    /// and is accepted only if it is exactly `<id>:<valid secret+check>`.
    #[test]
    fn basic_never_panics_and_accepts_only_a_valid_pair(payload in proptest::collection::vec(any::<u8>(), 0..120), raw in any::<bool>()) {
        let value = if raw {
            // Not base64-encoded at all: whatever bytes a header may hold.
            let mut v = b"Basic ".to_vec();
            v.extend(payload.iter().copied().filter(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)));
            v
        } else {
            basic(&payload).into_bytes()
        };
        let Ok(value) = HeaderValue::from_bytes(&value) else { return Ok(()); };
        let h = headers(&[(AUTHORIZATION, value)]);
        if let Ok(credential) = extractor().extract(&h) {
            prop_assert!(!raw);
            prop_assert_eq!(payload.len(), ID_LEN + 1 + SECRET_LEN + CHECK_LEN);
            prop_assert_eq!(&payload[..ID_LEN], credential.token.id.as_str().as_bytes());
            prop_assert_eq!(payload[ID_LEN], b':');
        }
    }

    /// A valid pair with one byte of its Basic payload corrupted: refused.
    #[test]
    fn corrupted_basic_pairs_are_refused(at in 0usize..55, byte in any::<u8>()) {
        let (id, token, _) = issued();
        let mut payload = format!("{}:{}", id, &token[SECRET_AT..]).into_bytes();
        prop_assume!(payload[at] != byte);
        payload[at] = byte;
        let h = headers(&[(AUTHORIZATION, HeaderValue::from_str(&basic(&payload)).unwrap())]);
        prop_assert!(extractor().extract(&h).is_err());
    }

    /// Any header map: never panics; a credential is only ever taken from a
    /// header present exactly once; no header means `Missing`.
    #[test]
    fn extraction_from_any_header_map(entries in proptest::collection::vec(header_entry(), 0..8)) {
        let (_, token, _) = issued();
        let mut h = HeaderMap::new();
        for (name, value) in &entries {
            let value = value.replace("$TOKEN", &token);
            let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value.as_bytes())) else { continue; };
            h.append(name, value);
        }
        let authorizations = h.get_all(AUTHORIZATION).iter().count();
        let key_headers = h.get_all("x-api-key").iter().count();
        match extractor().extract(&h) {
            Ok(c) => match c.source {
                CredentialSource::Authorization => prop_assert_eq!(authorizations, 1),
                CredentialSource::ApiKeyHeader => prop_assert_eq!(key_headers, 1),
            },
            Err(CredentialError::Missing) => prop_assert_eq!(authorizations + key_headers, 0),
            Err(_) => prop_assert!(authorizations + key_headers > 0),
        }
    }

    /// Identity headers in any disguise (case, `_` for `-`) are recognised,
    /// and names that are not under the prefix are not.
    #[test]
    fn spoofed_identity_names_in_any_disguise(suffix in "[a-z0-9_-]{0,12}", flips in proptest::collection::vec(any::<(bool, bool)>(), 10)) {
        let rules = rules();
        let disguised: String = "x-keygate-".chars().zip(&flips).map(|(c, &(upper, under))| {
            if c == '-' && under { '_' } else if upper { c.to_ascii_uppercase() } else { c }
        }).collect::<String>() + &suffix;
        let name = HeaderName::from_bytes(disguised.as_bytes()).unwrap();
        prop_assert!(rules.is_identity_header(&name), "{}", disguised);
    }

    #[test]
    fn other_names_are_not_identity_headers(name in "[a-z0-9_-]{1,24}") {
        let normalised = name.replace('_', "-");
        prop_assume!(!normalised.starts_with("x-keygate-"));
        let header = HeaderName::from_bytes(name.as_bytes()).unwrap();
        prop_assert!(!rules().is_identity_header(&header));
    }

    /// After the rewrite of any inbound header set, the upstream sees exactly
    /// our identity (one value each, ours), no credential, no hop-by-hop.
    #[test]
    fn rewrite_leaves_only_our_identity(entries in proptest::collection::vec(header_entry(), 0..12), from_key_header in any::<bool>()) {
        let (_, token, _) = issued();
        let mut h = HeaderMap::new();
        for (name, value) in &entries {
            let value = value.replace("$TOKEN", &token);
            let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value.as_bytes())) else { continue; };
            h.append(name, value);
        }
        let source = if from_key_header { CredentialSource::ApiKeyHeader } else { CredentialSource::Authorization };
        let key = verified_key();
        let table = routes();
        let route = table.select(None, "/orders/1").expect("route");
        rules().rewrite_request(&mut h, &connection(), Some((&key, source)), route, false);
        let expected: BTreeMap<&str, &str> = [
            ("x-keygate-key-id", key.id.as_str()),
            ("x-keygate-owner-id", "owner-1"),
            ("x-keygate-owner-type", "user"),
            ("x-keygate-owner-name", "bob@example.com"),
            ("x-keygate-role", "read"),
            ("x-keygate-namespace", "orders"),
        ].into_iter().collect();
        for name in h.keys() {
            let normalised = name.as_str().replace('_', "-");
            if normalised.starts_with("x-keygate-") {
                let want = expected.get(name.as_str());
                prop_assert!(want.is_some(), "spoofed header survived: {}", name);
                let values: Vec<_> = h.get_all(name).iter().collect();
                prop_assert_eq!(values.len(), 1);
                prop_assert_eq!(values[0].as_bytes(), want.unwrap().as_bytes());
            }
        }
        for name in expected.keys() {
            prop_assert!(h.contains_key(*name), "{} missing", name);
        }
        for hop in ["connection", "keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding", "upgrade", "trailer"] {
            prop_assert!(!h.contains_key(hop), "{} survived", hop);
        }
        match source {
            CredentialSource::Authorization => prop_assert!(!h.contains_key(AUTHORIZATION)),
            CredentialSource::ApiKeyHeader => prop_assert!(!h.contains_key("x-api-key")),
        }
    }
}

/// Header names and values an attacker would try: identity look-alikes,
/// credentials (with `$TOKEN` standing for a valid token), hop-by-hop names,
/// `Connection` naming other headers, and noise.
fn header_entry() -> impl Strategy<Value = (String, String)> {
    let names = prop_oneof![
        Just("authorization".to_string()),
        Just("x-api-key".to_string()),
        Just("x-keygate-key-id".to_string()),
        Just("X_KEYGATE_ROLE".to_string()),
        Just("x-keygate_owner-id".to_string()),
        Just("x-keygate-namespace".to_string()),
        Just("connection".to_string()),
        Just("keep-alive".to_string()),
        Just("transfer-encoding".to_string()),
        Just("upgrade".to_string()),
        Just("proxy-authorization".to_string()),
        Just("te".to_string()),
        "x-[a-z_-]{0,12}",
        "[A-Za-z0-9_-]{1,16}",
    ];
    let values = prop_oneof![
        Just("Bearer $TOKEN".to_string()),
        Just("$TOKEN".to_string()),
        Just("bearer  $TOKEN ".to_string()),
        Just("Basic a2c6eA==".to_string()),
        Just("Digest abc".to_string()),
        Just("x-keygate-role, keep-alive".to_string()),
        Just("admin".to_string()),
        "[ -~]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    (names, values)
}

fn rules() -> HeaderRules {
    HeaderRules::new("x-keygate-", "x-api-key", false)
}

fn routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config: Config = "[proxy]\nupstream = \"http://127.0.0.1:9\"\n\
             [[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://127.0.0.1:9\"\nnamespace = \"orders\"\n"
            .parse()
            .expect("config");
        RouteTable::from_config(&config)
    })
}

fn connection() -> ConnectionInfo {
    ConnectionInfo {
        peer_ip: HeaderValue::from_static("127.0.0.1"),
        proto: HeaderValue::from_static("http"),
        trusted_proxy: false,
    }
}

fn verified_key() -> VerifiedKey {
    let (id, _, digest) = issued();
    VerifiedKey::new(KeyRecord {
        id,
        digest,
        previous: None,
        disabled: false,
        expiry: None,
        namespaces: Vec::new(),
        owner_id: "owner-1".into(),
        owner_type: OwnerType::User,
        owner_name: "bob@example.com".into(),
        owner_access: Access {
            account_role: AccountRole::Read,
            namespaces: BTreeMap::new(),
        },
        owner_disabled: false,
    })
}

/// A valid-format token with a secret other than the key's (what an
/// attacker who knows an id can forge) passes parsing but never verifies,
/// against the real SQLite store through the real authenticator.
#[tokio::test]
async fn forged_secrets_for_a_real_id_never_verify() {
    use keygate::auth::{AuthError, Authenticator, CacheSettings};
    use keygate::telemetry::metrics::Metrics;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = keygate::store::open(&url).await.unwrap();
    let (_, _, token) = keygate::admin::bootstrap::bootstrap(
        &*store,
        &format(),
        "a@example.com",
        Some(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let settings = CacheSettings {
        capacity: 100,
        ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(5),
        stale_if_error: Duration::from_secs(60),
    };
    let auth = Authenticator::new(store, settings, Arc::new(Metrics::new(10)));
    let real = format().parse(token.expose().as_bytes()).unwrap();
    let now = SystemTime::now();
    assert!(auth.verify(&real, now).await.is_ok());
    for _ in 0..500 {
        let (forged, _) = format().issue_secret(&real.id);
        let forged = format().parse(forged.expose().as_bytes()).unwrap();
        assert_eq!(forged.id, real.id);
        assert_eq!(
            auth.verify(&forged, now).await.err(),
            Some(AuthError::Invalid)
        );
    }
}
