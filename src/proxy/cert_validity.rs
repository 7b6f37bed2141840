//! The validity period of the listener's certificate: read from the leaf
//! (RustCrypto's `x509-cert`), judged against the clock, and what keygate
//! does about it.
//!
//! - At start an expired or not yet valid certificate is served anyway, with
//!   a warning: refusing to start would turn an expiry into a full outage,
//!   also for clients that do not verify (nginx, HAProxy and Envoy start
//!   too). Within [`EXPIRY_WARNING`] of its notAfter, a warning as well.
//! - A reload refuses a *new* certificate that is expired or not yet valid,
//!   as any bad file: the one serving keeps serving. The certificate already
//!   served is not new (it may have expired while running): refusing it
//!   would refuse every later config change too.
//! - The served leaf's notAfter is exported as
//!   `keygate_tls_certificate_expiry_timestamp_seconds`, for alerts
//!   ([`now_serving`]).
//!
//! Times are shown in RFC 3339 (UTC), as `der`'s `DateTime` writes them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_cert::der::{DateTime, Decode};
use x509_cert::Certificate;

use crate::telemetry::metrics::Metrics;

/// How long before its notAfter a certificate is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// A leaf certificate's notBefore and notAfter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: DateTime,
    pub not_after: DateTime,
}

/// A certificate a reload refuses, or whose period cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ValidityError {
    #[error("the certificate in {path} expired at {not_after}")]
    Expired { path: PathBuf, not_after: DateTime },
    #[error("the certificate in {path} is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: DateTime },
    #[error("the validity period of the certificate in {path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

/// What the clock says of a validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    NotYetValid,
    Expired,
    /// Within [`EXPIRY_WARNING`] of its notAfter: whole days left.
    ExpiresSoon {
        days: u64,
    },
    Valid,
}

impl Validity {
    /// The validity period of a DER certificate.
    pub fn of(leaf: &CertificateDer<'_>) -> Result<Validity, x509_cert::der::Error> {
        let validity = Certificate::from_der(leaf)?.tbs_certificate.validity;
        Ok(Validity {
            not_before: validity.not_before.to_date_time(),
            not_after: validity.not_after.to_date_time(),
        })
    }

    /// notAfter in seconds since the Unix epoch (`DateTime` starts there).
    pub fn not_after_unix(&self) -> i64 {
        i64::try_from(self.not_after.unix_duration().as_secs()).unwrap_or(i64::MAX)
    }

    /// Where `now` falls in the period. notAfter is inclusive (RFC 5280
    /// 4.1.2.5): a certificate expires the second after it.
    pub fn standing(&self, now: SystemTime) -> Standing {
        // A clock before 1970 is before every period.
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (not_before, not_after) = (
            self.not_before.unix_duration(),
            self.not_after.unix_duration(),
        );
        if now < not_before {
            Standing::NotYetValid
        } else if now.as_secs() > not_after.as_secs() {
            Standing::Expired
        } else if not_after.saturating_sub(now) < EXPIRY_WARNING {
            Standing::ExpiresSoon {
                days: not_after.saturating_sub(now).as_secs() / 86_400,
            }
        } else {
            Standing::Valid
        }
    }

    /// `Err` naming `path` and the time passed or to come when the
    /// certificate is not valid at `now`.
    pub fn check(&self, path: &Path, now: SystemTime) -> Result<(), ValidityError> {
        match self.standing(now) {
            Standing::Expired => Err(ValidityError::Expired {
                path: path.to_owned(),
                not_after: self.not_after,
            }),
            Standing::NotYetValid => Err(ValidityError::NotYetValid {
                path: path.to_owned(),
                not_before: self.not_before,
            }),
            Standing::ExpiresSoon { .. } | Standing::Valid => Ok(()),
        }
    }
}

/// The validity period of the leaf of the certificate file at `path`.
pub fn read(path: &Path, leaf: &CertificateDer<'_>) -> Result<Validity, ValidityError> {
    Validity::of(leaf).map_err(|e| ValidityError::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// What an operator should hear of a certificate keygate serves or would
/// serve (start, accepted reload, `keygate check`): nothing when it is valid
/// for longer than [`EXPIRY_WARNING`].
#[derive(Debug)]
pub enum Notice {
    /// Expired, not yet valid, or a period that cannot be read.
    Invalid(ValidityError),
    ExpiresSoon {
        path: PathBuf,
        not_after: DateTime,
        days: u64,
    },
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::Invalid(error) => error.fmt(f),
            Notice::ExpiresSoon {
                path,
                not_after,
                days,
            } => write!(
                f,
                "the certificate in {} expires in {days} days, at {not_after}",
                path.display()
            ),
        }
    }
}

/// The leaf's validity (`None` when it cannot be read) and the notice it
/// calls for at `now`, if any.
pub fn inspect(
    path: &Path,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
) -> (Option<Validity>, Option<Notice>) {
    let validity = match read(path, leaf) {
        Ok(validity) => validity,
        Err(error) => return (None, Some(Notice::Invalid(error))),
    };
    let notice = match validity.check(path, now) {
        Err(error) => Some(Notice::Invalid(error)),
        Ok(()) => match validity.standing(now) {
            Standing::ExpiresSoon { days } => Some(Notice::ExpiresSoon {
                path: path.to_owned(),
                not_after: validity.not_after,
                days,
            }),
            _ => None,
        },
    };
    (Some(validity), notice)
}

/// [`inspect`], its notice logged as a warning: for the certificate that
/// serves from now on (at start, after an accepted reload).
pub fn warn_if_due(path: &Path, leaf: &CertificateDer<'_>, now: SystemTime) -> Option<Validity> {
    let (validity, notice) = inspect(path, leaf, now);
    match notice {
        Some(Notice::Invalid(ValidityError::Unreadable { .. })) => tracing::warn!(
            cert_file = %path.display(),
            "{}; keygate cannot warn of its expiry",
            notice.as_ref().map(ToString::to_string).unwrap_or_default()
        ),
        Some(notice @ Notice::Invalid(_)) => tracing::warn!(
            cert_file = %path.display(),
            "{notice}; serving it anyway: clients that verify it will refuse the connection"
        ),
        Some(notice) => tracing::warn!(cert_file = %path.display(), "{notice}"),
        None => {}
    }
    validity
}

/// For the certificate that serves from now on (at start, after an
/// accepted reload): [`warn_if_due`] on its leaf, and its notAfter shown
/// as `keygate_tls_certificate_expiry_timestamp_seconds` (no series when
/// the period cannot be read).
pub fn now_serving(path: &Path, certified: &CertifiedKey, now: SystemTime, metrics: &Metrics) {
    let validity = certified
        .cert
        .first()
        .and_then(|leaf| warn_if_due(path, leaf, now));
    metrics.set_tls_certificate_expiry(path, validity.map(|v| v.not_after_unix()));
}

/// On reload: refuses `new` when it is not the leaf being served and is
/// expired or not yet valid at `now`. A period that cannot be read is no
/// reason to refuse a certificate rustls takes ([`warn_if_due`] says so).
pub fn check_replacement(
    path: &Path,
    new: &CertificateDer<'_>,
    served: Option<&CertificateDer<'_>>,
    now: SystemTime,
) -> Result<(), ValidityError> {
    if served == Some(new) {
        return Ok(());
    }
    match read(path, new) {
        Ok(validity) => validity.check(path, now),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    /// A self-signed certificate valid from `not_before` to `not_after`.
    fn leaf(not_before: SystemTime, not_after: SystemTime) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn the_period_is_read_from_the_leaf() {
        let validity = Validity::of(&leaf(at(1_600_000_000), at(1_700_000_000))).unwrap();
        assert_eq!(validity.not_after_unix(), 1_700_000_000);
        assert_eq!(validity.not_after.to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(validity.not_before.to_string(), "2020-09-13T12:26:40Z");
        // Beyond 2049 notAfter is a GeneralizedTime.
        let far = Validity::of(&leaf(at(0), at(4_102_444_800))).unwrap();
        assert_eq!(far.not_after.to_string(), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn standing_follows_the_clock() {
        let validity = Validity::of(&leaf(at(100 * DAY), at(200 * DAY))).unwrap();
        let standing = |secs| validity.standing(at(secs));
        assert_eq!(standing(100 * DAY - 1), Standing::NotYetValid);
        assert_eq!(standing(100 * DAY), Standing::Valid);
        assert_eq!(standing(186 * DAY), Standing::Valid);
        assert_eq!(standing(186 * DAY + 1), Standing::ExpiresSoon { days: 13 });
        assert_eq!(standing(199 * DAY), Standing::ExpiresSoon { days: 1 });
        // notAfter itself is still valid; the second after is not.
        assert_eq!(standing(200 * DAY), Standing::ExpiresSoon { days: 0 });
        assert_eq!(standing(200 * DAY + 1), Standing::Expired);
    }

    #[test]
    fn check_names_the_file_and_the_time() {
        let validity = Validity::of(&leaf(at(1_600_000_000), at(1_700_000_000))).unwrap();
        let path = Path::new("/etc/keygate/tls.crt");
        let expired = validity.check(path, at(1_800_000_000)).unwrap_err();
        assert_eq!(
            expired.to_string(),
            "the certificate in /etc/keygate/tls.crt expired at 2023-11-14T22:13:20Z"
        );
        let early = validity.check(path, at(1_500_000_000)).unwrap_err();
        assert_eq!(
            early.to_string(),
            "the certificate in /etc/keygate/tls.crt is not valid before 2020-09-13T12:26:40Z"
        );
        validity.check(path, at(1_650_000_000)).unwrap();
    }

    #[test]
    fn inspect_gives_one_notice_when_due() {
        let path = Path::new("c.crt");
        let cert = leaf(at(100 * DAY), at(200 * DAY));
        let notice = |secs| inspect(path, &cert, at(secs)).1.map(|n| n.to_string());
        assert_eq!(notice(150 * DAY), None);
        assert_eq!(
            notice(195 * DAY).as_deref(),
            Some("the certificate in c.crt expires in 5 days, at 1970-07-20T00:00:00Z")
        );
        assert!(notice(201 * DAY).is_some_and(|n| n.contains("expired at 1970-07-20")));
        assert!(notice(DAY).is_some_and(|n| n.contains("not valid before 1970-04-11")));

        let (validity, notice) = inspect(path, &CertificateDer::from(vec![0x30, 0x00]), at(0));
        assert_eq!(validity, None);
        assert!(
            matches!(
                notice,
                Some(Notice::Invalid(ValidityError::Unreadable { .. }))
            ),
            "{notice:?}"
        );
    }

    #[test]
    fn a_reload_refuses_only_a_new_certificate_out_of_its_period() {
        let path = Path::new("c.crt");
        let now = at(1_000 * DAY);
        let good = leaf(at(0), at(2_000 * DAY));
        let expired = leaf(at(0), at(500 * DAY));
        let early = leaf(at(1_500 * DAY), at(2_000 * DAY));
        check_replacement(path, &good, Some(&expired), now).unwrap();
        assert!(matches!(
            check_replacement(path, &expired, Some(&good), now),
            Err(ValidityError::Expired { .. })
        ));
        assert!(matches!(
            check_replacement(path, &early, Some(&good), now),
            Err(ValidityError::NotYetValid { .. })
        ));
        // The certificate already served, expired since: not a replacement.
        check_replacement(path, &expired, Some(&expired), now).unwrap();
        // Unreadable is not refused here: rustls took it.
        check_replacement(path, &CertificateDer::from(vec![0x30, 0x00]), None, now).unwrap();
    }
}
